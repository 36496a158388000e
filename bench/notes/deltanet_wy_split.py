"""Experiment for chapter 5's WY kernel (section 5.8; results in deltanet.md), run on the H200 by hand:
the W and U products on 16-bit tensor cores with T split in two (hi + lo) and the row scalings folded into T's
columns, so K and V enter the products exactly as stored. Times it at 32K tokens against the current kernel,
compares W and Ũ with an fp32 (ieee) computation, and looks for NaN on extreme gates.
    python bench/notes/deltanet_wy_split.py      (on a GPU; the timing needs CUDA)
"""
import sys, torch, triton
import triton.language as tl
sys.path.insert(0, ".")
from minisparse import bench
import minisparse.deltanet.triton as dt
from minisparse.testing import rel_rms


@triton.jit
def wy_split(k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, gc_ptr, T, H, HV, K, V,
             C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hv = bh // HV, bh % HV
    h = hv // (HV // H)
    rows = tl.arange(0, C)
    t = n * C + rows
    tm = t < T
    k_rows = ((b * T + t[:, None]) * H + h) * K
    g = tl.load(g_ptr + (b * T + t) * HV + hv, mask=tm, other=0.0)
    beta = tl.load(beta_ptr + (b * T + t) * HV + hv, mask=tm, other=0.0)
    G = tl.cumsum(g, axis=0)
    KKt = tl.zeros((C, C), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kb = tl.load(k_ptr + k_rows + ks[None, :], mask=tm[:, None] & (ks[None, :] < K), other=0.0)
        KKt = tl.dot(kb, tl.trans(kb), KKt, input_precision=PRECISION)
    lower = rows[:, None] > rows[None, :]
    A = tl.where(lower, KKt * beta[:, None] * tl.exp(tl.where(lower, G[:, None] - G[None, :], float("-inf"))), 0.0)
    Tm = dt._unit_lower_inverse(A, C, PRECISION)
    dtype = k_ptr.dtype.element_ty
    Tk = Tm * (beta * tl.exp(G))[None, :]
    Tk_hi = Tk.to(dtype)
    Tk_lo = (Tk - Tk_hi.to(tl.float32)).to(dtype)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        mask = tm[:, None] & (ks[None, :] < K)
        kb = tl.load(k_ptr + k_rows + ks[None, :], mask=mask, other=0.0)
        w = tl.dot(Tk_hi, kb)
        if SPLIT:
            w = tl.dot(Tk_lo, kb, w)
        tl.store(w_ptr + ((b * T + t[:, None]) * HV + hv) * K + ks[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)
    Tv = Tm * beta[None, :]
    Tv_hi = Tv.to(dtype)
    Tv_lo = (Tv - Tv_hi.to(tl.float32)).to(dtype)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        v_off = ((b * T + t[:, None]) * HV + hv) * V + vs[None, :]
        mask = tm[:, None] & (vs[None, :] < V)
        vb = tl.load(v_ptr + v_off, mask=mask, other=0.0)
        u = tl.dot(Tv_hi, vb)
        if SPLIT:
            u = tl.dot(Tv_lo, vb, u)
        tl.store(u_ptr + v_off, u.to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(gc_ptr + (b * T + t) * HV + hv, G, mask=tm)


def run(B, T, H, K, V, glo, ghi, dtype, timeit):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k = dt._l2norm_rows(torch.randn(B, T, H, K, device=dev, dtype=dtype))
    v = torch.randn(B, T, H, V, device=dev, dtype=dtype)
    g = torch.empty(B, T, H, device=dev).uniform_(glo, ghi); beta = torch.rand(B, T, H, device=dev)
    NT = triton.cdiv(T, 64)
    BK = min(32, dt._pow2(K))
    w32, u32 = torch.empty(B, T, H, K, device=dev), torch.empty(B, T, H, V, device=dev)
    gc = torch.empty(B, T, H, device=dev)
    dt._fwd_wy_kernel[(NT, B * H)](k.float(), v.float(), g, beta, w32, u32, gc, gc, T, H, H, K, V, C=64, BK=BK,
                                   BV=BK, STORE_T=False, SPLIT_T=False, PRECISION="ieee", num_warps=4)  # fp32 reference: W, Ũ
    out = {}
    for name, split, cfg in (("split", True, dict(num_warps=4)), ("hi only", False, dict(num_warps=4)),
                             ("split w8", True, dict(num_warps=8))):
        w = torch.empty(B, T, H, K, device=dev, dtype=dtype); u = torch.empty(B, T, H, V, device=dev)
        f = lambda: wy_split[(NT, B * H)](k, v, g, beta, w, u, gc, T, H, H, K, V, C=64, BK=BK, BV=BK,
                                          PRECISION="tf32", SPLIT=split, **cfg)
        f()
        ms = bench.median_ms(f, warmup=3, rep=20) if timeit else float("nan")
        # W before the scan: compare Ũ (u is Ũ here, no scan ran) and W
        print(f"  {name:9s} K={K} g∈[{glo},{ghi}] {str(dtype)[6:]}: {ms:.3f} ms  W err {rel_rms(w.float(), w32.float()):.2e}"
              f"  Ũ err {rel_rms(u, u32):.2e}  nan {bool(w.isnan().any() or u.isnan().any())}")
    if timeit:  # the current kernel, for comparison (its u is Ũ before the scan too)
        w = torch.empty(B, T, H, K, device=dev, dtype=dtype); u = torch.empty(B, T, H, V, device=dev)
        f = lambda: dt._fwd_wy_kernel[(NT, B * H)](k, v, g, beta, w, u, gc, gc, T, H, H, K, V, C=64, BK=BK, BV=BK,
                                                   STORE_T=False, SPLIT_T=False, PRECISION="tf32", num_warps=4)
        f()
        print(f"  current   : {bench.median_ms(f, warmup=3, rep=20):.3f} ms  W err {rel_rms(w.float(), w32.float()):.2e}"
              f"  Ũ err {rel_rms(u, u32):.2e}")


run(2, 32768, 16, 128, 128, -1.0, 0.0, torch.bfloat16, True)
for K in (48, 128):
    for glo, ghi in ((-30.0, -5.0), (-1e-3, 0.0)):
        for dtype in (torch.bfloat16, torch.float16):
            run(1, 1000, 4, K, 48, glo, ghi, dtype, False)
