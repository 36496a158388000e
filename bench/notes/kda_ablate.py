"""What each part of chunk_kda's kernels costs: the op timed with one part removed by text substitution in the
exported kernels, each variant in its own process (the files are restored afterwards). Results in kda.md.

On a GPU:  PYTHONPATH=. python bench/notes/kda_ablate.py main gate-sums fwd-between fwd-walk wy-inverse bwd-walk

Parts (a variant may name several, joined by '+', e.g. gate-sums+fwd-walk):
    gate-sums             `_kda_gate_sums_kernel`'s `_decay_sums` as two plain loads of gates
    fwd-between           `_kda_fwd_between_kernel`'s loop over K's channel blocks run zero times
    fwd-walk / bwd-walk   the diagonal block's loop (the forward's walk; the backward's levels) run zero times
    wy-inverse            the WY kernel without `_unit_lower_inverse` (A_inv = diag(β) A')
The results are wrong, only the times mean anything: B 2, T 8K, H 16, K = V = 128, bf16, use_qk_l2norm.
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
FWD, BWD = ROOT / "minisparse/kda/chunk_fwd.py", ROOT / "minisparse/kda/chunk_bwd.py"
PLAIN_LOADS = '''

@triton.jit
def _plain_sums(g_chunk, rows, t, T, ks, km, HV, K, first, last):
    ok = (rows >= first) & (rows <= last) & (t < T)
    ok_next = (rows + 1 >= first) & (rows + 1 <= last) & (t + 1 < T)
    return (_load_gates(g_chunk + rows * HV * K, ok, ks, km),
            _load_gates(g_chunk + (rows + 1) * HV * K, ok_next, ks, km))
'''
PARTS = {  # part -> (file, text, replacement)
    "gate-sums": ("fwd", "into, onward = _decay_sums(g_ptr", "into, onward = _plain_sums(g_ptr"),
    "fwd-between": ("fwd", "    P = tl.zeros((BC, C), dtype=tl.float32)\n    for k0 in range(0, K, BK):",
                    "    P = tl.zeros((BC, C), dtype=tl.float32)\n    for k0 in range(0, 0, BK):"),
    "fwd-walk": ("fwd", "for d in range(1, BC):", "for d in range(1, 1):"),
    "bwd-walk": ("bwd", "for lvl in tl.static_range(LEVELS):", "for lvl in tl.static_range(0):"),
    "wy-inverse": ("fwd", "A_inv = _unit_lower_inverse(A * beta[:, None], C, PRECISION)", "A_inv = A * beta[:, None]"),
}


def sources(variant, fwd, bwd):
    """The two exported files with the variant's parts removed (and `_plain_sums` defined where it is used)."""
    text = {"fwd": fwd, "bwd": bwd}
    for part in variant.split("+"):
        if part == "main":
            continue
        where, old, new = PARTS[part]
        if old not in text[where]:
            raise SystemExit(f"{part}: {old!r} is not in chunk_{where}.py any more; update PARTS")
        text[where] = text[where].replace(old, new)
    if "_plain_sums(" in text["fwd"]:
        text["fwd"] += PLAIN_LOADS
    return text["fwd"], text["bwd"]


def run(name):
    import torch

    sys.path.insert(0, str(ROOT))
    from minisparse import bench
    from minisparse.kda import chunk_kda

    B, T, H, D = 2, 8192, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    g = -torch.rand(B, T, H, D, device="cuda", generator=gen)
    beta = torch.rand(B, T, H, device="cuda", generator=gen)
    do = torch.randn_like(v)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]

    def fwd():
        with torch.no_grad():
            return chunk_kda(q, k, v, g, beta, use_qk_l2norm=True)[0]

    def fwd_bwd():
        return torch.autograd.grad(chunk_kda(*leaves, use_qk_l2norm=True)[0], leaves, do)

    print(f"{name:32s} fwd {bench.median_ms(fwd, warmup=5, rep=30):.3f} ms   "
          f"fwd+bwd {bench.median_ms(fwd_bwd, warmup=5, rep=20):.3f} ms", flush=True)


def main(variants):
    fwd, bwd = FWD.read_text(), BWD.read_text()
    try:
        for name in variants:
            f, b = sources(name, fwd, bwd)
            FWD.write_text(f)
            BWD.write_text(b)
            out = subprocess.run([sys.executable, __file__, "--run", name], capture_output=True, text=True)
            print(out.stdout.strip() or f"{name}: failed\n{out.stderr[-800:]}", flush=True)
    finally:
        FWD.write_text(fwd)
        BWD.write_text(bwd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        run(sys.argv[2])
    else:
        main(sys.argv[1:] or ["main"])
