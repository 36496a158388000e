"""Chapter 3's benchmark: the Triton MLA decode kernel against the memory bandwidth, against the same absorbed
attention in plain PyTorch, and against SDPA decoding over the expanded MHA cache of the same model.

    PYTHONPATH=. python bench/mla.py --out bench/results      # on a GPU machine, from the repository root
    python bench/mla.py --out /tmp/mla-smoke --smoke            # tiny fp32 shapes on a CPU: checks the script runs

One decoding step of one layer, one new token a sequence, bf16, DeepSeek-V3's latent (kv_lora_rank 512 + rope 64):

1. `mla_decode` at H = 128 heads (DeepSeek-V3 on one GPU) and H = 16 (a tensor-parallel-8 shard), for
   B ∈ {1, 16, 64} sequences × T ∈ {4096, 16384, 65536} cached tokens. Reported: median ms, GB/s of latent cache
   read (B·T·576·2 bytes) and its fraction of the H200's measured HBM copy bandwidth (4.25 TB/s; the issue's target
   is 60 %), TFLOP/s (2·B·H·T·(2·512 + 64)).
2. "torch absorbed (bmm)": the same attention in PyTorch — scores = [q̃ | qᴿ] @ [c | kᴿ]ᵀ, softmax, @ c.
3. "SDPA, expanded MHA cache": PyTorch's scaled_dot_product_attention over K [B, 128, T, 192] and V [B, 128, T, 128],
   the cache the same model would hold without MLA — where it fits in ~20 GB; otherwise only its bytes are recorded.

Medians by minisparse.bench.median_ms (CUDA events). The split kernel is autotuned (`runtime.set_autotune(True)`):
for each shape, the candidates of its LAUNCH_TABLE row are timed once, outside the measurement, and each mla_decode
row records the configuration that ran. Writes DIR/mla.json (minisparse.bench format; `pass` is
"decode, B=…, H=…" so the book's Performance page draws one panel per batch) and prints a table last.
"""
from __future__ import annotations

import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench, runtime  # noqa: E402
from minisparse.mla import (mha_decode_bytes, mha_decode_flops, mla_decode, mla_decode_bytes,  # noqa: E402
                            mla_decode_flops)
from minisparse.testing import rel_rms  # noqa: E402

DC, DR, DN, DV = 512, 64, 128, 128  # DeepSeek-V3: latent, rotary, no-RoPE key and value head sizes
BATCHES, CONTEXTS, HEADS = (1, 16, 64), (4096, 16384, 65536), (128, 16)
HBM_GBPS = 4250.0  # H200 HBM copy bandwidth measured on the project's machine (DESIGN.md §7)
MEMORY_CAP = 20e9  # bytes: skip a configuration whose tensors would exceed this
SCALE = (DN + DR) ** -0.5
DEVICE, DTYPE = "cuda", torch.bfloat16
SMOKE = False
USED: dict[str, dict] = {}  # kernel name -> the launch configuration of its last launch


def _recording(launch):
    """runtime.launch, remembering the configuration each kernel launched with (the autotuner's pick)."""
    def recorded(kernel, *args, **kwargs):
        USED[kernel] = config = launch(kernel, *args, **kwargs)
        return config
    return recorded


def timed(fn) -> float | None:
    return bench.timed(fn, smoke=SMOKE)


def absorbed_bmm(ql, qr, buf):
    """The absorbed attention in plain PyTorch: ql [B, H, Dc], qr [B, H, Dr], buf [B, T, Dc + Dr] -> [B, H, Dc]."""
    q = torch.cat([ql, qr], dim=-1)  # [B, H, 576]
    s = torch.bmm(q, buf.transpose(1, 2)).float() * SCALE  # [B, H, T]
    return torch.bmm(torch.softmax(s, dim=-1).to(buf.dtype), buf[..., :DC])  # [B, H, Dc]


def rows_for(B: int, T: int, H: int) -> list[dict]:
    cache_bytes = mla_decode_bytes(T, DC, DR, B=B, dtype_bytes=2 if DTYPE != torch.float32 else 4)
    flops = mla_decode_flops(T, H, DC, DR, B=B)
    base = {"pass": f"decode, B={B}, H={H}", "B": B, "T": T, "H": H}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    buf = torch.randn(B, T, DC + DR, generator=g, device=DEVICE).to(DTYPE)  # one [c | kᴿ] buffer, as MLACache
    ql = torch.randn(B, 1, H, DC, generator=g, device=DEVICE).to(DTYPE)
    qr = torch.randn(B, 1, H, DR, generator=g, device=DEVICE).to(DTYPE)
    kv, kr = buf[..., :DC], buf[..., DC:]

    def ours(ql=ql, qr=qr, kv=kv, kr=kr):  # bound now: the inputs are deleted below, after the timings
        return mla_decode(ql, qr, kv, kr, SCALE)

    out = ours()  # compile (and autotune) outside the timing
    config = {k: v for k, v in USED.get("mla.decode_split", {}).items() if v is not None}
    ref = absorbed_bmm(ql[:, 0].float(), qr[:, 0].float(), buf.float()) if B * T <= 16 * 16384 else None
    err = rel_rms(out[:, 0].float(), ref) if ref is not None else None
    rows = []
    ms = timed(ours)
    gbps = cache_bytes / ms / 1e6 if ms else None
    rows.append(dict(impl="mla_decode", **base, ms=ms, bytes=cache_bytes, gbps=gbps,
                     hbm_fraction=gbps / HBM_GBPS if gbps else None, tflops=flops / ms / 1e9 if ms else None,
                     rel_rms_vs_fp32=err, config=config))
    ms = timed(lambda ql=ql, qr=qr, buf=buf: absorbed_bmm(ql[:, 0], qr[:, 0], buf))
    rows.append(dict(impl="torch absorbed (bmm)", **base, ms=ms, bytes=cache_bytes,
                     gbps=cache_bytes / ms / 1e6 if ms else None, tflops=flops / ms / 1e9 if ms else None))
    del buf, ql, qr, kv, kr, out, ref

    # SDPA over the expanded cache of the same model (only at H = 128: the model itself)
    if H == 128:
        exp_bytes = mha_decode_bytes(T, H, DN + DR, DV, B=B, dtype_bytes=2 if DTYPE != torch.float32 else 4)
        row = dict(impl="SDPA, expanded MHA cache", **base, ms=None, bytes=exp_bytes, gbps=None, tflops=None)
        if exp_bytes <= MEMORY_CAP:
            k = torch.randn(B, H, T, DN + DR, generator=g, device=DEVICE).to(DTYPE)
            v = torch.randn(B, H, T, DV, generator=g, device=DEVICE).to(DTYPE)
            q = torch.randn(B, H, 1, DN + DR, generator=g, device=DEVICE).to(DTYPE)
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=SCALE))
            row.update(ms=ms, gbps=exp_bytes / ms / 1e6 if ms else None,
                       tflops=mha_decode_flops(T, H, DN + DR, DV, B=B) / ms / 1e9 if ms else None)
            del k, v, q
        else:
            row["note"] = f"skipped: the expanded cache alone is {exp_bytes / 1e9:.1f} GB > {MEMORY_CAP / 1e9:.0f} GB"
        rows.append(row)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shown = f"{rows[0]['ms']:.3f} ms, {rows[0]['gbps']:.0f} GB/s" if rows[0]["ms"] else "failed"
    print(f"  B={B:2d} T={T:6d} H={H:3d}: mla_decode {shown}" + (f"  (rel RMS vs fp32 {err:.1e})" if err else ""))
    return rows


def main(argv=None) -> int:
    global SMOKE, DEVICE, DTYPE
    ap = bench.script_parser("mla", __doc__)
    ap.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    ap.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    ap.add_argument("--heads", type=int, nargs="*", default=list(HEADS))
    args = ap.parse_args(argv)
    if args.smoke:
        SMOKE, DEVICE, DTYPE = True, "cpu", torch.float32
        args.batches, args.contexts, args.heads = [1, 2], [64, 96], [128, 16]
    if not bench.start_script("mla", args.smoke):
        return 2
    runtime.set_autotune(True)  # the interpreter (--smoke) runs the first configuration of its row
    runtime.launch = _recording(runtime.launch)
    t_start = time.perf_counter()
    rows = []
    for H in args.heads:
        for B in args.batches:
            for T in args.contexts:
                need = B * T * (DC + DR) * 2 + B * H * T * 4  # the cache + the fp32 scores of the bmm baseline
                if need > MEMORY_CAP:
                    print(f"  B={B} T={T} H={H}: skipped ({need / 1e9:.1f} GB > {MEMORY_CAP / 1e9:.0f} GB)")
                    continue
                rows += rows_for(B, T, H)
    config = dict(dtype=str(DTYPE).replace("torch.", ""), kv_lora_rank=DC, rope_dim=DR, qk_nope_head_dim=DN,
                  v_head_dim=DV, query_tokens=1, batches=args.batches, contexts=args.contexts, heads=args.heads,
                  hbm_copy_gbps=HBM_GBPS, target_hbm_fraction=0.6, memory_cap_gb=MEMORY_CAP / 1e9,
                  autotune=runtime.autotuning(),
                  note="one layer, one decoding step; GB/s = B·T·576·2 bytes of latent cache / time; mla_decode "
                       "without lengths (no host read), as the MLA layer calls it; each mla_decode row's config is "
                       "the split kernel's launch configuration")
    path = bench.save_results("mla", config, rows, path=args.out / "mla.json")

    print(f"\nwrote {path} in {time.perf_counter() - t_start:.0f} s")
    for r in rows:  # the memory win, where both were timed
        if r["impl"] == "SDPA, expanded MHA cache" and r["ms"]:
            ours = next(s for s in rows if s["impl"] == "mla_decode" and (s["B"], s["T"], s["H"]) == (r["B"], r["T"],
                                                                                                    r["H"]))
            if ours["ms"]:
                print(f"memory win B={r['B']} T={r['T']}: latent {ours['bytes'] / 1e6:,.0f} MB in {ours['ms']:.3f} ms "
                      f"vs expanded {r['bytes'] / 1e6:,.0f} MB in {r['ms']:.3f} ms: {r['ms'] / ours['ms']:.1f}x faster, "
                      f"{r['bytes'] / ours['bytes']:.0f}x fewer bytes")
    print(f"\n{'impl':26s} {'H':>4s} {'B':>3s} {'T':>6s} {'ms':>9s} {'GB/s':>7s} {'% HBM':>6s} {'TFLOP/s':>8s} "
          f"{'GB':>7s}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else ("skipped" if r.get("note") else "failed")
        gbps = f"{r['gbps']:.0f}" if r.get("gbps") else ""
        frac = f"{r['gbps'] / HBM_GBPS:.0%}" if r.get("gbps") and r["impl"] == "mla_decode" else ""
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        print(f"{r['impl']:26s} {r['H']:4d} {r['B']:3d} {r['T']:6d} {ms:>9s} {gbps:>7s} {frac:>6s} {tf:>8s} "
              f"{r['bytes'] / 1e9:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
