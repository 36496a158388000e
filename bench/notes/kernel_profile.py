"""Where an op of chapters 1 and 4-8 spends its time on a GPU, and which launch configuration each of its kernels runs
best with.

    PYTHONPATH=. python bench/notes/kernel_profile.py kda                 # on a CUDA machine: the profile (about 30 s)
    PYTHONPATH=. python bench/notes/kernel_profile.py lightning --sweep   # and the sweep of every row it launches
    PYTHONPATH=. python bench/notes/kernel_profile.py kda --sweep kda.fwd_states kda.bwd_states   # only these rows
    PYTHONPATH=. python bench/notes/kernel_profile.py deltanet --T 32768  # another length
    PYTHONPATH=. python bench/notes/kernel_profile.py window --T 32768 --sweep   # flash_attention, window 1024
    PYTHONPATH=. python bench/notes/kernel_profile.py nsa --T 65536 --sweep      # parallel_nsa, with a decoding step
    PYTHONPATH=. python bench/notes/kernel_profile.py nsa --profile fwd decode   # the kernels of these passes
    PYTHONPATH=. python bench/notes/kernel_profile.py dsa --T 16384 --sweep      # DSA's prefill, its rows swept

B 2, T 8192, H 16, K = V = 128, bf16 (the first shape of bench/lightning.py, deltanet.py and kda.py): the gated ops
with use_qk_l2norm, gates -U(0, 1), β U(0, 1); lightning with chapter 4's slopes of layer 0 of 2; "window" is
chapter 1's flash_attention with a sliding window of 1024 keys (bench/attention.py's windowed rows); "nsa" is chapter
7's parallel_nsa at bench/nsa.py's shapes (B 1, HQ 64, H 4, D 128, blocks of 64, 16 selected, window 512, gates
U(0, 1)), with a third pass: one decoding step of the last token (cached summaries), timed as a CUDA graph; "dsa" is
chapter 8's prefill forward at bench/dsa.py's shapes (B 1, 128 heads, latent 512 + 64, indexer 64 × 128, top-k 2,048),
its passes the indexer's scores, the sparse attention over a fixed selection, and both with the top-k between.
First the median times of the passes with the launch table's configurations, then a torch.profiler table of the
CUDA kernels of three forward + backward passes (or of the passes named by --profile, e.g. --profile fwd decode).
With --sweep, each row of runtime.LAUNCH_TABLE that the op launches is forced configuration by configuration
(`minisparse.bench.sweep_rows`) and the pass it belongs to is timed whole, its result compared with the table
configuration's: the rows' order in the table is the order of these times (bench/notes/<op>.md).
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import bench  # noqa: E402

B, H, D = 2, 16, 128


def _grid(**axes):
    """Every combination of the axes' values, as launch configurations."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


WARPS_STAGES = _grid(num_warps=(2, 4, 8), num_stages=(1, 2))
SWEEPS = {  # op -> row -> (pass timed, configurations)
    "kda": {
        "kda.fwd_products": ("fwd", WARPS_STAGES),
        "kda.gate_sums": ("fwd", _grid(num_warps=(2, 4, 8), num_stages=(1,), BK=(32, 64, 128))),
        "kda.fwd_wy": ("fwd", [dict(c, BV=bv) for c in WARPS_STAGES for bv in (32, 64)]),
        "kda.fwd_states": ("fwd", _grid(num_warps=(4, 8), num_stages=(2, 3), BV=(32, 16))),
        "kda.fwd_output": ("fwd", _grid(num_warps=(4, 8), num_stages=(1, 2), BV=(32, 64, 128))),
        "kda.bwd_du_local": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1, 2), BV=(32, 64, 128))),
        # 8 warps: illegal memory accesses at K = 128, which end the process (bench/notes/kda.md)
        "kda.bwd_states": ("fwd+bwd", _grid(num_warps=(4,), num_stages=(1, 2), BV=(32, 16))),
        "kda.bwd_chunk": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1,), BV=(32, 64))),
        "kda.bwd_products": ("fwd+bwd", WARPS_STAGES),
    },
    "lightning": {
        "lightning.fwd_states": ("fwd", _grid(num_warps=(2, 4), num_stages=(2, 3, 4), BK=(32, 64),
                                              BV=(32, 64))),
        "lightning.fwd_output": ("fwd", _grid(num_warps=(4, 8), num_stages=(2, 3), BK=(32, 64, 128), BV=(64, 128))),
        "lightning.bwd_dstates": ("fwd+bwd", _grid(num_warps=(2, 4), num_stages=(2, 3), BK=(32, 64, 128),
                                                   BV=(32, 64))),
        "lightning.bwd_dqkv.k128": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1, 2, 3), BV=(32, 64, 128))),
    },
    "window": {
        "attention.dkdv": ("fwd+bwd", [dict(num_warps=w, num_stages=s, BLOCK_M=m, BLOCK_N=n)
                                       for w, s, m, n in itertools.product((4, 8), (2, 3), (32, 64), (64, 128))]),
        "attention.dq": ("fwd+bwd", [dict(num_warps=w, num_stages=s, BLOCK_M=m, BLOCK_N=n)
                                     for w, s, m, n in itertools.product((4, 8), (2, 3), (64, 128), (32, 64))]),
    },
    "nsa": {
        "nsa.select": ("fwd", _grid(num_warps=(4, 8), num_stages=(1, 2), BT=(1, 2, 4, 8), BC=(32, 64))),
        "nsa.selection.fwd": ("fwd", _grid(num_warps=(4, 8), num_stages=(1, 2, 3), BN=(32, 64))),
        "nsa.gated_sum": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1,), BR=(8, 16, 32, 64))),
        "nsa.decode.scores": ("decode", _grid(num_warps=(2, 4, 8), num_stages=(1, 2), BC=(32, 64))),
        "nsa.decode.select": ("decode", _grid(num_warps=(1, 2, 4, 8), num_stages=(1,), BN=(32, 64),
                                              TOPN=(2048, 8192), launch_pdl=(True,))),
        "nsa.decode.merge": ("decode", _grid(num_warps=(1, 2, 4), num_stages=(1,), BP=(8, 16),
                                             BGM=(1, 2, 4), BVM=(32, 64), launch_pdl=(True, False))),
    },
    "dsa": {
        "dsa.indexer": ("indexer", _grid(num_warps=(4, 8), num_stages=(2, 3), BT=(2, 4), BN=(64, 128))),
        "dsa.sparse.fwd.d512": ("sparse", _grid(num_warps=(8,), num_stages=(1, 2, 3), BG=(64,), BN=(16, 32, 64))
                                + _grid(num_warps=(4,), num_stages=(1, 2), BG=(16, 32), BN=(32,))),
    },
    "deltanet": {
        "deltanet.fwd_states": ("fwd", _grid(num_warps=(4, 8), num_stages=(2, 3, 4), BV=(16, 32, 64))),
        "deltanet.bwd_du_local": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1, 2, 3), BV=(32, 64, 128))),
        "deltanet.bwd_states": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1, 2), BV=(16, 32, 64))),
        "deltanet.bwd_wy": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1, 2), BK=(32, 64), BV=(16, 32, 64))),
        "deltanet.bwd_keys": ("fwd+bwd", _grid(num_warps=(4, 8), num_stages=(1, 2), BK=(32, 64), BV=(16, 32, 64))),
    },
}


def nsa_passes(T: int):
    """parallel_nsa's forward, forward + backward and one decoding step at bench/nsa.py's shapes."""
    from minisparse.nsa import mean_pool, parallel_nsa

    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = make(1, T, 64, 128), make(1, T, 4, 128), make(1, T, 4, 128)
    gates = [torch.rand(1, T, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]
    do = make(1, T, 64, 128)
    kw = dict(block_counts=16, block_size=64, window_size=512)
    k_cmp, v_cmp = mean_pool(k, 64), mean_pool(v, 64)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            return parallel_nsa(q, k, v, *gates, **kw)

    def fwd_bwd():
        return torch.autograd.grad(parallel_nsa(*leaves, *gates, **kw), leaves, do)

    def decode():
        with torch.no_grad():
            return parallel_nsa(q[:, -1:], k, v, *(x[:, -1:] for x in gates), **kw, k_cmp=k_cmp, v_cmp=v_cmp)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "decode": decode}


def dsa_passes(T: int):
    """DSA's prefill forward at bench/dsa.py's shapes, T <= 16K: the indexer's scores (one chunk, −∞ set to 0 so
    that the sweep's comparison sees the finite scores), the sparse attention over the indexer's selection, and the
    whole prefill (lightning_indexer, then the attention)."""
    from minisparse.dsa.triton import _chunk_rows, _score_chunk, lightning_indexer, sparse_attention_triton

    if _chunk_rows(1, T, T) < T:
        raise SystemExit(f"kernel_profile.py dsa: T up to {_chunk_rows(1, 16384, 16384)} (one chunk of scores)")

    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape, s=1.0: (s * torch.randn(*shape, device="cuda", generator=g)).bfloat16()  # noqa: E731
    q, kv = make(1, T, 128, 576, s=0.5), make(1, T, 1, 576, s=0.5)
    q_idx, k_idx, w = make(1, T, 64, 128), make(1, T, 128), make(1, T, 64, s=64 ** -0.5)
    scale = 192 ** -0.5
    idx = lightning_indexer(q_idx, k_idx, w, 2048)

    def run(fn):
        def pass_():
            with torch.no_grad():
                return fn()
        return pass_

    return {"indexer": run(lambda: _score_chunk(q_idx, k_idx, w, 0, T, 128 ** -0.5).nan_to_num_(neginf=0.0)),
            "sparse": run(lambda: sparse_attention_triton(q, kv, kv[..., :512], idx, scale)),
            "fwd": run(lambda: sparse_attention_triton(q, kv, kv[..., :512], lightning_indexer(
                q_idx, k_idx, w, 2048), scale))}


def passes(op: str, T: int):
    """The forward (no autograd) and the forward + backward of `op`, on fixed inputs."""
    if op == "nsa":
        return nsa_passes(T)
    if op == "dsa":
        return dsa_passes(T)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(v)
    beta = torch.rand(B, T, H, device="cuda", generator=g)
    if op == "window":
        from minisparse.attention import flash_attention

        extra = []
        call = lambda *x: flash_attention(*x, window=1024)  # noqa: E731
    elif op == "kda":
        from minisparse.kda import chunk_kda

        extra = [-torch.rand(B, T, H, D, device="cuda", generator=g), beta]
        call = lambda *x: chunk_kda(*x, use_qk_l2norm=True)[0]  # noqa: E731
    elif op == "deltanet":
        from minisparse.deltanet import chunk_gated_delta_rule

        extra = [-torch.rand(B, T, H, device="cuda", generator=g), beta]
        call = lambda *x: chunk_gated_delta_rule(*x, use_qk_l2norm=True)[0]  # noqa: E731
    else:
        from minisparse.lightning import chunk_lightning_attn, minimax_slopes

        slope = minimax_slopes(H, 0, 2).cuda()
        extra = []
        call = lambda *x: chunk_lightning_attn(*x, slope)[0]  # noqa: E731
    inputs = [q, k, v, *extra]
    leaves = [x.detach().clone().requires_grad_() for x in inputs]

    def fwd():
        with torch.no_grad():
            return call(*inputs)

    def fwd_bwd():
        return torch.autograd.grad(call(*leaves), leaves, do)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", choices=sorted(SWEEPS))
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--sweep", nargs="*", metavar="ROW", default=None,
                    help="also force every configuration of each row the op launches (or of the rows named)")
    ap.add_argument("--profile", nargs="+", metavar="PASS", default=None,
                    help="the passes whose CUDA kernels are tabled (default fwd+bwd, dsa fwd; nsa also has decode)")
    args = ap.parse_args(argv)
    fns = passes(args.op, args.T)

    def timed(fn, **kw):
        """Median ms of a pass; a decoding step as a CUDA graph (from Python it times the host)."""
        return bench.median_ms(bench.graphed(fn) if fn is fns.get("decode") else fn, **kw)

    for name, fn in fns.items():
        print(f"{args.op} T {args.T}, table configurations: {name} {timed(fn, warmup=5, rep=20):.4f} ms",
              flush=True)
    for name in args.profile or ["fwd+bwd" if "fwd+bwd" in fns else "fwd"]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fns[name]()
            torch.cuda.synchronize()
        print(f"{name}, three calls:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))
    if args.sweep is not None:
        bench.sweep_rows(fns, SWEEPS[args.op], only=args.sweep or None, out=lambda line: print(line, flush=True),
                         timer=lambda fn: timed(fn, warmup=3, rep=10))


if __name__ == "__main__":
    main()
