"""Fixtures shared by the kernel tests."""
import pytest
import torch

import minisparse  # noqa: F401  before any test module imports fla (which imports triton): see minisparse.runtime


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel's launcher allocates with torch.empty / empty_like starts as NaN, so an element the
    kernel forgets to write shows up in the comparison (uninitialised memory is often zero, which can hide it)."""
    real_empty, real_like = torch.empty, torch.empty_like

    def nan_filled(make):
        def make_poisoned(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make_poisoned

    monkeypatch.setattr(torch, "empty", nan_filled(real_empty))
    monkeypatch.setattr(torch, "empty_like", nan_filled(real_like))
