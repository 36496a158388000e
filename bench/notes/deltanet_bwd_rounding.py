"""Chapter 5's backward with its recomputed W, U or chunk states rounded to bf16, against the fp32 recurrence (CPU).

The backward recomputes W, U and the chunk states in fp32 (`_wy_and_states(..., recompute=True)`); storing any of them
in bf16 would halve what its kernels read. This replays that rounding alone: the recomputation runs in fp32 as now,
then the chosen tensors are rounded to bf16 and back before the backward kernels read them (in the interpreter, fp32
products). Inputs are rounded to bf16 first, as a 16-bit run sees them; the errors are relative RMS of each gradient
against autograd through `naive_recurrent_gated_delta_rule` on the same inputs. Results: deltanet.md (2026-12-05).
    python bench/notes/deltanet_bwd_rounding.py            (CPU, about a minute)
"""
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import minisparse.deltanet.chunk_bwd as chunk_bwd  # noqa: E402
from minisparse.deltanet import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule  # noqa: E402
from minisparse.testing import make_log_gates, rel_rms  # noqa: E402

RECOMPUTE = chunk_bwd._wy_and_states
ROUND = set()  # of "w", "u", "states"


def _rounded(*args, **kwargs):
    w, u, kr, ainv, states, ht = RECOMPUTE(*args, **kwargs)
    r16 = lambda x: x.bfloat16().float()  # noqa: E731
    if kwargs.get("recompute"):
        w, u, states = (r16(x) if name in ROUND else x for name, x in (("w", w), ("u", u), ("states", states)))
    return w, u, kr, ainv, states, ht


def gradients(fn, inputs, do, dht):
    xs = [x.clone().requires_grad_(True) for x in inputs]
    o, s = fn(*xs[:5], initial_state=xs[5], output_final_state=True, use_qk_l2norm=True)
    ((o * do).sum() + (s * dht).sum()).backward()
    return {name: x.grad for name, x in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), xs)}


def main():
    chunk_bwd._wy_and_states = _rounded
    for T, H, HV, K, V, gates in [(200, 2, 4, 32, 48, (-2.0, 0.0)), (256, 1, 2, 64, 64, (-0.1, 0.0)),
                                  (256, 1, 1, 64, 64, (-30.0, -5.0))]:
        gen = torch.Generator().manual_seed(T)
        q, k = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, K, generator=gen)
        v = torch.randn(1, T, HV, V, generator=gen)
        g = make_log_gates(1, T, HV, low=gates[0], high=gates[1], seed=T + 1)
        beta, h0 = torch.rand(1, T, HV, generator=gen), 0.5 * torch.randn(1, HV, K, V, generator=gen)
        inputs = [x.bfloat16().float() for x in (F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, g, beta, h0)]
        do, dht = torch.randn(1, T, HV, V, generator=gen), torch.randn(1, HV, K, V, generator=gen)
        ref = gradients(naive_recurrent_gated_delta_rule, inputs, do, dht)
        print(f"T {T}, H {H}, HV {HV}, K {K}, V {V}, gates {gates}")
        for rounded in ((), ("w",), ("u",), ("states",), ("w", "u", "states")):
            ROUND.clear()
            ROUND.update(rounded)
            got = gradients(chunk_gated_delta_rule, inputs, do, dht)
            errs = {n: rel_rms(got[n], ref[n]) for n in ref}
            print(f"  {'+'.join(rounded) or 'fp32 (as now)':16s}", "  ".join(f"{n} {e:.1e}" for n, e in errs.items()))


if __name__ == "__main__":
    main()
