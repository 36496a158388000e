"""Chapter 3's split kernel under each configuration of its LAUNCH_TABLE row, forced one at a time (the split plan
then uses the forced BLOCK_H), at DeepSeek-V3's latent (512 + 64), bf16, one new token a sequence, for the shapes of
bench/mla.py. What bench/notes/mla.md's table came from.
On a GPU:   PYTHONPATH=. python bench/notes/mla_sweep.py [--heads 128 16] [--batches 1 16 64] [--contexts ...]
                [--waves 1 2 4] [--wide]
--waves N plans the splits to fill the GPU N times over (the planner aims at one program an SM: N = 1); --wide also
forces configurations outside the row (BLOCK_H 16-64 × BLOCK_N 64-128, 4 or 8 warps, 2-4 stages).
"""
import argparse
import itertools

import torch

from minisparse import bench, runtime
from minisparse.mla import mla_decode, mla_decode_bytes

WIDE = [dict(BLOCK_H=h, BLOCK_N=n, num_warps=w, num_stages=s)
        for h, n, w, s in itertools.product((16, 32, 64), (64, 128), (4, 8), (2, 3, 4))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, nargs="*", default=[128, 16])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--waves", type=int, nargs="*", default=[1])
    ap.add_argument("--wide", action="store_true")
    args = ap.parse_args(argv)
    row = runtime.launch_configs("mla.decode_split", "cuda", torch.bfloat16)
    in_row = len(row)  # the table's own configurations: the columns of the summary line
    row += [c for c in WIDE if args.wide and c not in row]
    sms = runtime.sm_count("cuda")
    names = [f"{c['BLOCK_H']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}" for c in row]
    print(f"{torch.cuda.get_device_name(0)}; row {runtime.arch('cuda')}: {', '.join(names[:in_row])}")
    print(f"{'H':>4s} {'B':>3s} {'T':>6s} " + " ".join(f"{n:>16s}" for n in names[:in_row]) + "   best (GB/s)")
    for H in args.heads:
        for B in args.batches:
            for T in args.contexts:
                if B * T * 576 * 2 > 20e9:
                    continue
                g = torch.Generator(device="cuda").manual_seed(0)
                buf = torch.randn(B, T, 576, generator=g, device="cuda").to(torch.bfloat16)  # [c | kᴿ], as MLACache
                ql = torch.randn(B, 1, H, 512, generator=g, device="cuda").to(torch.bfloat16)
                qr = torch.randn(B, 1, H, 64, generator=g, device="cuda").to(torch.bfloat16)
                for waves in args.waves:
                    runtime.sm_count = lambda dev, n=sms * waves: n  # what the split planner fills
                    times = []
                    for config in row:
                        with runtime.launch_config("mla.decode_split", **config):
                            times.append(bench.timed(
                                lambda: mla_decode(ql, qr, buf[..., :512], buf[..., 512:], 192**-0.5)))
                    best = min(t for t in times if t is not None)
                    gbps = mla_decode_bytes(T, B=B) / best / 1e6
                    if args.wide:  # one line a configuration
                        for name, t in zip(names, times):
                            print(f"{H:4d} {B:3d} {T:6d} waves {waves} {name:>16s} "
                                  + (f"{t:.3f} ms, {mla_decode_bytes(T, B=B) / t / 1e6:.0f} GB/s" if t else "fails"))
                    cells = " ".join(f"{t:13.3f} ms" if t is not None else f"{'fails':>16s}" for t in times[:in_row])
                    print(f"{H:4d} {B:3d} {T:6d} waves {waves} {cells}   best {best:.3f} ms "
                          f"({names[times.index(best)]}, {gbps:.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
