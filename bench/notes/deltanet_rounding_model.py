"""Chapter 5's bf16 forward, every rounding point replayed in PyTorch on a CPU, against the fp32 recurrence.

Which stored or multiplied quantity costs how much accuracy on the chapter's hardest check (T = 1000, K = 32, V = 48,
HV = 4, gates in [-1e-3, 0]: a state that forgets almost nothing), and on two others. Each flag rounds one quantity
to bf16: the normalised q and k (rqk), A_inv (rT: fla's; the chapter's kernels split A_inv in two bf16 halves,
modelled as exact), W (rw), Ũ (ru), the stored chunk states (rs), U for the output's product (rU), P = QKᵀ ⊙ Γ for
that product (rP), and U as the scan's 16-bit operand (rUscan). The H200's measurements of the same choices are in
deltanet.md (2026-11-29).
    python bench/notes/deltanet_rounding_model.py          (CPU, a few seconds)
"""
import sys

import torch

sys.path.insert(0, ".")
from minisparse.deltanet import l2norm, naive_recurrent_gated_delta_rule  # noqa: E402
from minisparse.testing import make_bthd, make_log_gates, rel_rms  # noqa: E402


def r16(x):
    return x.bfloat16().float()


def emulate(q, k, v, g, beta, h0, rqk=True, rT=False, rw=True, ru=False, rs=True, rU=False, rP=False, rUscan=True):
    """The chunk form (C = 64) with the chosen roundings; q, k, v [B, T, HV, ·] (key heads already repeated)."""
    B, T, H, K = q.shape
    qn, kn = l2norm(q.float()), l2norm(k.float())
    if rqk:
        qn, kn = r16(qn), r16(kn)
    qn, kn, vf = (x.float().transpose(1, 2) for x in (qn, kn, v))
    gf, bf = g.transpose(1, 2), beta.transpose(1, 2)
    S, outs = h0.float().clone(), []
    for c0 in range(0, T, 64):
        L = min(64, T - c0)
        qc, kc, vc = qn[:, :, c0:c0 + L], kn[:, :, c0:c0 + L], vf[:, :, c0:c0 + L]
        bc, G = bf[:, :, c0:c0 + L], gf[:, :, c0:c0 + L].cumsum(-1)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        Gamma = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")))
        A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * Gamma).tril(-1)
        A_inv = torch.linalg.inv(torch.eye(L) + A)
        A_inv = r16(A_inv) if rT else A_inv
        W, Ut = A_inv @ ((bc * G.exp())[..., None] * kc), A_inv @ (bc[..., None] * vc)
        W, Ut = (r16(W) if rw else W), (r16(Ut) if ru else Ut)
        S_stored = r16(S) if rs else S
        U = Ut - W @ S_stored
        P = (qc @ kc.transpose(-1, -2)) * Gamma
        o = (qc @ S_stored) * G.exp()[..., None] + (r16(P) if rP else P) @ (r16(U) if rU else U)
        outs.append(o * K ** -0.5)
        decayed = U * (G[..., -1:] - G).exp()[..., None]
        S = G[..., -1, None, None].exp() * S + kc.transpose(-1, -2) @ (r16(decayed) if rUscan else decayed)
    return r16(torch.cat(outs, 2).transpose(1, 2)), S


CHOICES = [
    ("rows normalised in bf16, Ũ and U fp32", {}),
    ("  the same with q, k normalised in fp32", dict(rqk=False)),
    ("this chapter: q, k in fp32 scalings; Ũ, U, P in bf16", dict(rqk=False, ru=True, rU=True, rP=True)),
    ("  the same with Ũ in fp32", dict(rqk=False, rU=True, rP=True)),
    ("fla's choices: rows in bf16; A_inv, Ũ, U, P in bf16", dict(rT=True, ru=True, rU=True, rP=True)),
    ("everything fp32 but the output", dict(rqk=False, rw=False, rs=False, rUscan=False)),
]


def case(title, B, T, H, HV, K, V, low, high, seeds=(21, 22, 23, 24, 25, 26)):
    q, k = make_bthd(B, T, H, K, seed=seeds[0]), make_bthd(B, T, H, K, seed=seeds[1])
    v = make_bthd(B, T, HV, V, seed=seeds[2])
    beta = torch.rand(B, T, HV, generator=torch.Generator().manual_seed(seeds[3]))
    h0 = torch.randn(B, HV, K, V, generator=torch.Generator().manual_seed(seeds[4]))
    g = make_log_gates(B, T, HV, low=low, high=high, seed=seeds[5])
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, initial_state=h0,
                                                    output_final_state=True, use_qk_l2norm=True)
    qe, ke = (x.repeat_interleave(HV // H, 2) for x in (q, k))
    print(title)
    for name, flags in CHOICES:
        o, s = emulate(qe, ke, v, g, beta, h0, **flags)
        print(f"  {name:58s} o {rel_rms(o, o_ref):.2e}  final state {rel_rms(s, s_ref):.2e}")


if __name__ == "__main__":
    case("chapter's check, g in [-1e-3, 0]", 1, 1000, 2, 4, 32, 48, -1e-3, 0.0)
    case("chapter's check, g in [-30, -5]", 1, 1000, 2, 4, 32, 48, -30.0, -5.0)
    case("K = V = 128, g in [-1e-3, 0]", 1, 1000, 2, 2, 128, 128, -1e-3, 0.0, seeds=(1, 2, 3, 4, 5, 6))
