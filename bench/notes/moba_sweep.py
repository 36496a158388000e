"""MoBA's forward on a GPU, stage by stage, and each launch configuration of its three kernels forced in turn.

    PYTHONPATH=. python bench/notes/moba_sweep.py [--T 32768] [--profile] [--sweep [ROW ...]]   # on a CUDA machine

bench/nsa.py's MoBA shapes (B 1, HQ = H = 16, D 128, chunks of 128, top-16, bf16, random inputs). Prints the median
ms of: the gate (`moba_gate`), the inversion (`_moba_plan`), the forward given the indices (`_moba_forward`: the
inversion, the partial results and the merge), the whole `parallel_moba`, and SDPA's causal forward. --profile adds
a torch.profiler table of parallel_moba's CUDA kernels. --sweep forces each configuration of "moba.gate",
"moba.partial" and "moba.merge" (or of the rows named) in turn (`minisparse.bench.sweep_rows`: the pass it belongs
to timed whole, its result compared with the table configuration's).
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import bench, runtime  # noqa: E402
from minisparse.nsa import moba_gate, parallel_moba  # noqa: E402
from minisparse.nsa.triton import _moba_forward, _moba_plan  # noqa: E402

B, HQ, H, D, CHUNK, TOPK = 1, 16, 16, 128, 128, 16


def _grid(**axes):
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


SWEEP = {  # row -> (pass timed, configurations)
    "moba.gate": ("gate", _grid(num_warps=(4, 8), num_stages=(1, 2), BM=(32, 64, 128), BC=(32, 64))),
    "moba.partial": ("forward given idx", _grid(num_warps=(4, 8), num_stages=(2, 4), BR=(32, 64), NT=(4, 8),
                                                BN=(64, 128))),
    "moba.merge": ("forward given idx", _grid(num_warps=(4, 8), num_stages=(2, 3), BM=(32, 64, 128), BN=(64, 128))),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="*", default=[32768])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sweep", nargs="*", metavar="ROW", default=None)
    args = ap.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    for T in args.T:
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(B, T, n, D, device=dev, dtype=dt, generator=g) for n in (HQ, H, H))
        idx = moba_gate(q, k, CHUNK, TOPK)
        plan = runtime.launch_configs("moba.partial", q.device, dt)[0]
        stages = {
            "gate": lambda: moba_gate(q, k, CHUNK, TOPK),
            "plan": lambda: _moba_plan(idx, T, CHUNK, plan["BR"] * plan["NT"]),
            "forward given idx": lambda: _moba_forward(q, k, v, idx, CHUNK, D ** -0.5),
            "parallel_moba": lambda: parallel_moba(q, k, v, CHUNK, TOPK),
            "SDPA causal": lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
        }
        with torch.no_grad():
            times = {name: bench.median_ms(fn, warmup=10, rep=50) for name, fn in stages.items()}
        print(f"T = {T}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items())
              + f"; SDPA / parallel_moba = {times['SDPA causal'] / times['parallel_moba']:.2f}x", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
                for _ in range(5):
                    parallel_moba(q, k, v, CHUNK, TOPK)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
        if args.sweep is not None:
            with torch.no_grad():
                bench.sweep_rows({n: stages[n] for n in ("gate", "forward given idx")}, SWEEP,
                                 only=args.sweep or None, out=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
