"""The decoding indexer's launch choices on a GPU: warps, stages and key tile × the number of key ranges a sequence.

    PYTHONPATH=. python bench/notes/dsa_sweep.py OUT.json   # on a CUDA machine (sm_89+ for FP8); about a minute

B 16 sequences, one query token each, 64K index keys, 64 heads × 128 dims (bench/dsa.py's decoding shapes):
`indexer_score_kernel` launched directly (not through the launch table) for every (num_warps, num_stages, BN) and
key-range count, bf16 and FP8, timed by do_bench (median). Prints the fastest configuration of each dtype and the
launch table's configuration by range count; writes every row to OUT.json.
"""
from __future__ import annotations

import itertools
import json
import pathlib
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import runtime  # noqa: E402
from minisparse.dsa.triton import indexer_score_kernel  # noqa: E402

B, T, HI, DI = 16, 65536, 64, 128


def main(out):
    g = torch.Generator(device="cuda").manual_seed(1)
    q_idx = torch.randn(B, 1, HI, DI, device="cuda", generator=g).bfloat16()
    k_idx = torch.randn(B, T, DI, device="cuda", generator=g).bfloat16()
    w = (torch.randn(B, 1, HI, device="cuda", generator=g) * HI ** -0.5).bfloat16()
    scores = torch.empty(B, 1, T, device="cuda")
    rows = []
    dtypes = {"bf16": (q_idx, k_idx)}
    if torch.cuda.get_device_capability() >= (8, 9):
        dtypes["fp8"] = (q_idx.to(torch.float8_e4m3fn), k_idx.to(torch.float8_e4m3fn))
    for dt, (q, k) in dtypes.items():
        for warps, stages, BN in itertools.product((4, 8), (2, 3, 4, 5), (64, 128, 256)):
            for ranges in (8, 16, 17, 24, 32, 48, 64):
                KS = triton.cdiv(triton.cdiv(T, ranges), 64) * 64
                grid = (1, triton.cdiv(T, KS), B)

                def launch(q=q, k=k, KS=KS, grid=grid, warps=warps, stages=stages, BN=BN):
                    indexer_score_kernel[grid](q, k, w, scores, 1, T, 0, 1, T, KS, DI ** -0.5, HI=HI, DI=DI,
                                               BHI=HI, BDI=DI, BT=1, BN=BN, PRECISION=None,
                                               num_warps=warps, num_stages=stages)
                try:
                    launch()
                    ms = do_bench(launch, warmup=10, rep=40, return_mode="median")
                except Exception as err:  # noqa: BLE001 - a config that does not compile is recorded as None
                    print(f"{dt} {warps}/{stages}/{BN}: {type(err).__name__}")
                    ms = None
                rows.append(dict(dtype=dt, warps=warps, stages=stages, BN=BN, ranges=grid[1], ms=ms))
        timed = [r for r in rows if r["dtype"] == dt and r["ms"]]
        print(dt, "fastest:", min(timed, key=lambda r: r["ms"]))
        row = "dsa.indexer.split.fp8" if dt == "fp8" else "dsa.indexer.split"
        first = runtime.launch_configs(row, torch.device("cuda"), q.dtype)[0]
        print(dt, f"{row} first config {first}, µs by ranges:",
              [(r["ranges"], round(1e3 * r["ms"])) for r in timed
               if (r["warps"], r["stages"], r["BN"]) == (first["num_warps"], first["num_stages"], first["BN"])])
    pathlib.Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dsa_sweep.json")
