import sys, torch
sys.path.insert(0, ".")
from minisparse.deltanet import naive_recurrent_gated_delta_rule, l2norm
from minisparse.testing import make_bthd, make_log_gates, rel_rms
torch.manual_seed(0)
def r16(x): return x.bfloat16().float()
def tf32(x):
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)
def emul(q, k, v, g, beta, h0, scan="bf16", store="bf16", split=False, rw=True, ru=True, rs=True, rU=True):
    # q, k, v bf16 [B,T,H,·]; HV = H here (expand for GQA beforehand)
    B, T, H, K = q.shape; V = v.shape[-1]
    st = r16 if store == "bf16" else (lambda x: x)
    pr = r16 if scan == "bf16" else tf32
    qn, kn = r16(l2norm(q)), r16(l2norm(k))
    qn, kn, vf = (x.float().transpose(1, 2) for x in (qn, kn, v))
    gf, bf = g.transpose(1, 2), beta.transpose(1, 2)
    S = h0.float().clone(); outs = []; scale = K ** -0.5
    for c0 in range(0, T, 64):
        L = min(64, T - c0)
        qc, kc, vc = qn[:, :, c0:c0+L], kn[:, :, c0:c0+L], vf[:, :, c0:c0+L]
        bc = bf[:, :, c0:c0+L]; G = gf[:, :, c0:c0+L].cumsum(-1)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        Gamma = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")))
        A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * Gamma).tril(-1)
        Tm = torch.linalg.inv(torch.eye(L) + A)
        W = tf32(Tm) @ tf32((bc * G.exp())[..., None] * kc); Ut = tf32(Tm) @ tf32(bc[..., None] * vc)
        W = st(W) if rw else W; Ut = st(Ut) if ru else Ut
        Sst = st(S) if rs else S
        if split:
            Sh = r16(S); U = Ut - W @ Sh - W @ r16(S - Sh)
        else:
            U = Ut - pr(W) @ pr(S)
        Ust = st(U) if rU else U
        o = (qc @ Sst) * G.exp()[..., None] + r16((qc @ kc.transpose(-1, -2)) * Gamma) @ Ust
        outs.append(scale * o)
        ud = U * (G[..., -1:] - G).exp()[..., None]
        if split:
            uh = r16(ud); S = G[..., -1, None, None].exp() * S + kc.transpose(-1, -2) @ uh + kc.transpose(-1, -2) @ r16(ud - uh)
        else:
            S = G[..., -1, None, None].exp() * S + pr(kc).transpose(-1, -2) @ pr(ud)
    return r16(torch.cat(outs, 2).transpose(1, 2)), S
def case(B, T, H, HV, K, V, low, high, seeds=(21, 22, 23, 24, 25, 26), h0scale=1.0):
    q, k = make_bthd(B, T, H, K, seed=seeds[0]), make_bthd(B, T, H, K, seed=seeds[1])
    v = make_bthd(B, T, HV, V, seed=seeds[2])
    beta = torch.rand(B, T, HV, generator=torch.Generator().manual_seed(seeds[3]))
    h0 = h0scale * torch.randn(B, HV, K, V, generator=torch.Generator().manual_seed(seeds[4]))
    g = make_log_gates(B, T, HV, low=low, high=high, seed=seeds[5])
    args = (q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta)
    ref16 = naive_recurrent_gated_delta_rule(*args, initial_state=h0, use_qk_l2norm=True, output_final_state=True)
    ref32 = naive_recurrent_gated_delta_rule(*(x.float() for x in args[:3]), g, beta, initial_state=h0, use_qk_l2norm=True, output_final_state=True)
    rep = HV // H
    qe, ke = (x.repeat_interleave(rep, 2) for x in args[:2])
    for name, kw in (("main", dict(scan="tf32", store="fp32")), ("cur", dict(scan="bf16")),
                     ("cur, W fp32", dict(rw=False)), ("cur, Ut fp32", dict(ru=False)), ("cur, states fp32", dict(rs=False)), ("cur, U fp32", dict(rU=False)),
                     ("cur, W+Ut fp32", dict(rw=False, ru=False)), ("cur, S+U fp32", dict(rs=False, rU=False)), ("tf32 scan, W+Ut fp32", dict(scan="tf32", rw=False, ru=False))):
        o, s = emul(qe, ke, args[2], g, beta, h0, **kw)
        print(f"  {name:30s} vs ref16 {rel_rms(o, ref16[0].float()):.2e}  vs ref32 {rel_rms(o, ref32[0]):.2e}  state {rel_rms(s, ref32[1]):.2e}")
print("chapter case g ~ 0"); case(1, 1000, 2, 4, 32, 48, -1e-3, 0.0)
print("chapter case extreme"); case(1, 1000, 2, 4, 32, 48, -30., -5.)
print("test T=1000 K128 gates(-2,0)"); case(2, 1000, 2, 2, 128, 128, -2.0, 0.0, seeds=(1,2,3,4,5,6), h0scale=0.5)
