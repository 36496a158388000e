"""minisparse: the sparse architectures of today's open LLMs, built chapter by chapter.

Importing the package first imports `minisparse.runtime`, which switches Triton to its interpreter on machines
without a GPU (see `minisparse.runtime`).
"""
from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

from . import runtime  # noqa: F401  (must come first: sets TRITON_INTERPRET before any kernel module)

try:
    __version__ = _version("minisparse")
except _NotInstalled:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["runtime", "__version__"]
