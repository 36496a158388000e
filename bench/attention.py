"""Benchmark minisparse's flash_attention against PyTorch SDPA (causal) and flex_attention (sliding window).

Run on a GPU:  python bench/attention.py [--sweep]   (writes bench/results/attention.json, the file that
chapter 1's "Measure" section plots; --out DIR writes DIR/attention.json)

Shapes: B=2, H=16, D=128, bf16, T from 1k to 32k; forward and forward+backward medians from
`triton.testing.do_bench`. TFLOP/s count 4·B·H·D FLOPs a visible (query, key) pair for the forward (two matmuls)
and 3.5 times that for forward+backward (five more matmuls in the backward), the usual flash-attention
convention; causal attention has T(T+1)/2 visible pairs.

Without --sweep the kernels run the first configuration of their `runtime.LAUNCH_TABLE` rows that fits the GPU
("attention.fwd", "attention.dkdv", "attention.dq"): the rows hold the sweep's winners (bench/notes/attention.md).
`--sweep` first times a few configurations of each kernel at T=8192 (forced with `runtime.launch_config`) and
forces the fastest for the rest of the run; `--autotune` instead lets Triton's autotuner pick from each row.
"""

import argparse
import contextlib
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it
import minisparse.attention.triton as fa  # noqa: E402  (first: on a CPU it switches on the interpreter)
from minisparse import bench, runtime  # noqa: E402

B, H, D = 2, 16, 128
DTYPE = torch.bfloat16
DEVICE = "cuda"

SWEEP = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages); dkdv: BLOCK_M = query rows a step, BLOCK_N = keys owned
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4)],
    "dkdv": [(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (16, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)],
}


def forced(configs):
    """Force {"fwd": (BLOCK_M, BLOCK_N, num_warps, num_stages), ...} on the kernels' table rows inside a with block."""
    stack = contextlib.ExitStack()
    for name, (block_m, block_n, warps, stages) in configs.items():
        stack.enter_context(runtime.launch_config(f"attention.{name}", BLOCK_M=block_m, BLOCK_N=block_n,
                                                  num_warps=warps, num_stages=stages))
    return stack


def median_ms(fn, grad_to_none=None):
    if DEVICE == "cpu":  # --smoke: one call, wall clock
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return bench.median_ms(fn, grad_to_none=grad_to_none)


def visible_pairs(T, window=None):
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def tflops(ms, T, window=None, backward=False):
    flops = 4 * B * H * D * visible_pairs(T, window) * (3.5 if backward else 1.0)
    return flops / (ms * 1e-3) / 1e12


def make_inputs(T, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(4))
    return q, k, v, do


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------------------------
def time_flash(T, window=None, backward=True):
    q, k, v, do = make_inputs(T)
    out = {"fwd_ms": median_ms(lambda: fa.flash_attention(q, k, v, window=window))}
    if backward:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def step():
            fa.flash_attention(qg, kg, vg, window=window).backward(do)

        out["fwd_bwd_ms"] = median_ms(step, grad_to_none=[qg, kg, vg])
    return out


def time_sdpa(T):
    q, k, v, do = (x.transpose(1, 2).contiguous() for x in make_inputs(T))  # [B, H, T, D]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = {"fwd_ms": median_ms(lambda: sdpa(q, k, v, is_causal=True))}
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out["fwd_bwd_ms"] = median_ms(lambda: sdpa(qg, kg, vg, is_causal=True).backward(do), grad_to_none=[qg, kg, vg])
    return out


def check_vs_sdpa(T):
    """Relative RMS difference of o, dq, dk, dv against SDPA (both bf16), as a sanity check at benchmark sizes."""
    q, k, v, do = make_inputs(T, seed=1)
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    o = fa.flash_attention(qa, ka, va)
    o.backward(do)
    qs, ks, vs = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    o_s = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    o_s.backward(do.transpose(1, 2))
    pairs = [(o, o_s), (qa.grad, qs.grad), (ka.grad, ks.grad), (va.grad, vs.grad)]
    return {name: rel_rms(a, b.transpose(1, 2)) for name, (a, b) in zip(("o", "dq", "dk", "dv"), pairs)}


def sweep(T):
    """Time each kernel's candidate configurations at one length; returns per-config times and the fastest of each."""
    q, k, v, do = make_inputs(T)
    scale = D**-0.5
    o, lse = fa._forward(q, k, v, True, scale, None)
    results, best = {}, {}
    for name in ("fwd", "dkdv", "dq"):
        results[name] = {}
        for cfg in SWEEP[name]:
            try:
                if name == "fwd":
                    with forced({"fwd": cfg}):
                        ms = median_ms(lambda: fa.flash_attention(q, k, v))
                else:  # the other backward kernel at its best so far, or its table row
                    configs = {n: best[n + "_cfg"] for n in ("dkdv", "dq") if n + "_cfg" in best}
                    with forced({**configs, name: cfg}):
                        ms = median_ms(lambda: fa._backward(do, q, k, v, o, lse, True, scale, None))
            except Exception as e:  # a tile that does not fit or fails to compile: note it and go on
                results[name][str(cfg)] = f"error: {type(e).__name__}: {str(e)[:200]}"
                continue
            results[name][str(cfg)] = ms
            print(f"  sweep {name:5s} {cfg}: {ms:.3f} ms", flush=True)
            if name + "_cfg" not in best or ms < results[name][str(best[name + "_cfg"])]:
                best[name + "_cfg"] = cfg
    return results, {n: best[n + "_cfg"] for n in ("fwd", "dkdv", "dq") if n + "_cfg" in best}


def time_flex_window(T, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    mask = create_block_mask(sliding, None, None, T, T, device=DEVICE)
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v, do = (x.transpose(1, 2).contiguous() for x in make_inputs(T))
    out = {"fwd_ms": median_ms(lambda: flex(q, k, v, block_mask=mask))}
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out["fwd_bwd_ms"] = median_ms(lambda: flex(qg, kg, vg, block_mask=mask).backward(do), grad_to_none=[qg, kg, vg])
    return out


# ----------------------------------------------------------------------------------------------------------------
def host_ms_per_call(T=1024, n=50):
    """Wall-clock ms per flash fwd+bwd call when calls are queued back to back: the host-side floor at small T."""
    q, k, v, do = make_inputs(T)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    host, total = bench.host_ms(lambda: fa.flash_attention(qg, kg, vg).backward(do), calls=n, warmup=3)
    return {"T": T, "issue_ms_per_fwd_bwd": host, "total_ms_per_fwd_bwd": total}


def add_rows(rows, impl, T, timing, window=None):
    for pass_, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwd_bwd_ms")):
        if key in timing:
            ms = timing[key]
            rows.append({"impl": impl, "pass": pass_, "T": T, "ms": round(ms, 5),
                         "tflops": round(tflops(ms, T, window, backward=pass_ == "fwd+bwd"), 2)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="directory for attention.json")
    parser.add_argument("--ts", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--sweep", action="store_true", help="pick each kernel's tiles by timing at --sweep-t first")
    parser.add_argument("--autotune", action="store_true", help="let Triton's autotuner pick from the table rows")
    parser.add_argument("--sweep-t", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--window-ts", default="8192,32768")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds; later sections are skipped past it")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU interpreter (checks the script)")
    args = parser.parse_args()
    global B, H, D, DTYPE, DEVICE
    if args.smoke:
        B, H, D, DTYPE, DEVICE = 1, 2, 32, torch.float32, "cpu"
        if args.ts == parser.get_default("ts"):  # interpreter-sized lengths unless asked for others
            args.ts, args.window_ts, args.window = "64,128", "128", 32
        for name in SWEEP:
            SWEEP[name] = [(32, 32, 4, 1), (64, 64, 4, 1)]
    runtime.set_autotune(args.autotune)
    start = time.time()
    ts = [int(t) for t in args.ts.split(",")]
    doc = {
        "name": "attention",
        **(bench.smoke_environment() if args.smoke else bench.environment()),
        "config": {"B": B, "H": H, "D": D, "dtype": str(DTYPE).removeprefix("torch."), "causal": True,
                   "window": args.window, "layout": "flash_attention [B, T, H, D]; SDPA and flex [B, H, T, D]",
                   "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
                   "tflops": "4*B*H*D FLOPs a visible (query, key) pair for fwd, 3.5x that for fwd+bwd",
                   "launch": "autotuned from runtime.LAUNCH_TABLE" if args.autotune else "runtime.LAUNCH_TABLE"},
        "rows": [],
    }
    path = pathlib.Path(args.out) / "attention.json"

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")

    if args.sweep:
        sweep_ms, chosen = sweep(args.sweep_t)
        doc["sweep"] = {"T": args.sweep_t, "ms": sweep_ms}
        doc["config"]["tiles"] = {n: list(c) for n, c in chosen.items()}
        print("chosen tiles:", chosen, flush=True)
        save()
    tiles = {n: tuple(c) for n, c in doc["config"].get("tiles", {}).items()}

    with forced(tiles):
        doc["check_vs_sdpa_rel_rms"] = {"T": ts[0], **check_vs_sdpa(ts[0])}
        if DEVICE == "cuda":
            doc["host_overhead"] = host_ms_per_call()
        for T in ts:
            if time.time() - start > args.budget:
                print(f"T={T}: skipped, over the time budget")
                continue
            flash, sdpa = time_flash(T), time_sdpa(T)
            add_rows(doc["rows"], "flash_attention", T, flash)
            add_rows(doc["rows"], "sdpa", T, sdpa)
            print(f"T={T:6d} flash fwd {flash['fwd_ms']:8.3f} ms ({tflops(flash['fwd_ms'], T):4.0f} TF/s) "
                  f"fwd+bwd {flash['fwd_bwd_ms']:8.3f} ({tflops(flash['fwd_bwd_ms'], T, backward=True):4.0f}) | "
                  f"sdpa fwd {sdpa['fwd_ms']:8.3f} ({tflops(sdpa['fwd_ms'], T):4.0f}) "
                  f"fwd+bwd {sdpa['fwd_bwd_ms']:8.3f} ({tflops(sdpa['fwd_bwd_ms'], T, backward=True):4.0f}) | "
                  f"throughput vs sdpa {sdpa['fwd_ms'] / flash['fwd_ms']:.2f} fwd, "
                  f"{sdpa['fwd_bwd_ms'] / flash['fwd_bwd_ms']:.2f} fwd+bwd", flush=True)
            save()

        for T in [int(t) for t in args.window_ts.split(",") if t]:
            if time.time() - start > args.budget:
                print(f"window T={T}: skipped, over the time budget")
                continue
            label = f"(window {args.window})"
            add_rows(doc["rows"], f"flash_attention {label}", T, time_flash(T, window=args.window), args.window)
            try:
                add_rows(doc["rows"], f"flex_attention {label}", T, time_flex_window(T, args.window), args.window)
            except Exception as e:  # flex needs a GPU for its backward, and a working torch.compile
                doc.setdefault("errors", []).append(f"flex_attention T={T}: {type(e).__name__}: {str(e)[:300]}")
            print(f"window {args.window} T={T}: " + ", ".join(
                f"{r['impl']} {r['pass']} {r['ms']:.3f} ms" for r in doc["rows"] if r["T"] == T and label in r["impl"]),
                flush=True)
            save()
    doc["elapsed_s"] = round(time.time() - start, 1)
    save()
    print("wrote", path)


if __name__ == "__main__":
    main()
