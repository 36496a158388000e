"""Where chunk_kda spends its time on a GPU, and which launch configuration each of its kernels runs best with.

    PYTHONPATH=. python bench/notes/kda_profile.py           # on a CUDA machine: the profile (about 30 s)
    PYTHONPATH=. python bench/notes/kda_profile.py --sweep   # and the sweep of every kda.* row (about 3 min)
    PYTHONPATH=. python bench/notes/kda_profile.py --sweep kda.fwd_states kda.bwd_states   # only these rows

B 2, T 8192, H 16, K = V = 128, bf16, use_qk_l2norm (bench/kda.py's first shape). First the median times of the
forward and of the forward + backward with the launch table's configurations, then a torch.profiler table of the
CUDA kernels of three forward + backward passes. With --sweep, each row of runtime.LAUNCH_TABLE that chunk_kda
launches is forced, configuration by configuration (runtime.launch_config), and the pass it belongs to is timed
whole: the row's order in the table is the order of these times (bench/notes/kda.md). Each forced configuration's
result (the output, or every gradient) is compared with the table configuration's, so a configuration that computes
something else shows a relative RMS far above bf16 rounding instead of only a time.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import bench, runtime  # noqa: E402
from minisparse.kda import chunk_kda  # noqa: E402
from minisparse.testing import rel_rms  # noqa: E402

B, T, H, D = 2, 8192, 16, 128
WARPS_STAGES = [dict(num_warps=w, num_stages=s) for w, s in itertools.product((2, 4, 8), (1, 2))]
SWEEP = {  # row -> (pass timed, configurations)
    "kda.fwd_products": ("fwd", WARPS_STAGES),
    "kda.fwd_wy": ("fwd", [dict(c, BV=bv) for c in WARPS_STAGES for bv in (32, 64)]),
    "kda.fwd_states": ("fwd", [dict(num_warps=w, num_stages=s, BV=bv) for w in (4, 8) for s in (2, 3)
                               for bv in (32, 16)]),
    "kda.fwd_output": ("fwd", [dict(num_warps=w, num_stages=s, BV=bv) for w in (4, 8) for s in (1, 2)
                               for bv in (32, 64)]),
    "kda.bwd_states": ("fwd+bwd", [dict(num_warps=w, num_stages=s, BV=bv) for w in (8, 4) for s in (1, 2)
                                   for bv in (32, 16)]),
    "kda.bwd_chunk": ("fwd+bwd", [dict(num_warps=w, num_stages=1, BV=bv) for w in (4, 8) for bv in (32, 64)]),
    "kda.bwd_products": ("fwd+bwd", WARPS_STAGES),
}


def passes():
    """The forward (no autograd) and the forward + backward, on fixed inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    gate = -torch.rand(B, T, H, D, device="cuda", generator=g)
    beta = torch.rand(B, T, H, device="cuda", generator=g)
    do = torch.randn_like(v)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gate, beta)]

    def fwd():
        with torch.no_grad():
            return chunk_kda(q, k, v, gate, beta, use_qk_l2norm=True)[0]

    def fwd_bwd():
        return torch.autograd.grad(chunk_kda(*leaves, use_qk_l2norm=True)[0], leaves, do)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _tensors(result):
    """A pass's result as a tuple: the output alone, or the gradients."""
    return result if isinstance(result, tuple) else (result,)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", nargs="*", metavar="ROW", default=None,
                    help="also force every configuration of each kda.* row (or of the rows named)")
    args = ap.parse_args(argv)
    fns = passes()
    for name, fn in fns.items():
        print(f"table configurations: {name} {bench.median_ms(fn, warmup=5, rep=20):.3f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fns["fwd+bwd"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))
    if args.sweep is None:
        return
    reference = {name: fn() for name, fn in fns.items()}  # what the table's configurations compute
    for row, (name, configs) in SWEEP.items():
        if args.sweep and row not in args.sweep:
            continue
        for config in configs:
            try:
                with runtime.launch_config(row, **config):
                    ms = bench.median_ms(fns[name], warmup=3, rep=10)
                    got = fns[name]()
                err = max(rel_rms(out, ref) for out, ref in zip(_tensors(got), _tensors(reference[name])))
                print(f"{row} {config}: {name} {ms:.3f} ms, {err:.1e} from the table's result", flush=True)
            except Exception as err:  # noqa: BLE001 (a configuration that does not fit says so and the sweep goes on)
                print(f"{row} {config}: {type(err).__name__}: {str(err)[:120]}", flush=True)


if __name__ == "__main__":
    main()
