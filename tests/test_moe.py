"""minisparse.moe (chapter 2): routers and balancing vs transformers, dispatch, the Triton grouped GEMM vs a loop and
vs torch._grouped_mm (forward and both gradients), the MoE layer vs transformers' blocks, bad input, the checkers.

On a CPU the kernels run in Triton's interpreter in fp32 at small shapes (M=70, K=48, N=40, 5 experts, two of them
empty); on a GPU the same tests run on CUDA, plus bf16 versions against an fp32 reference from the same rounded
inputs (fwd ≤ 5e-3, grads ≤ 8e-3 relative RMS).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import minisparse
from minisparse.moe import (MoE, capacity_mask, check_route_topk_softmax, check_tile_schedule, check_unpermute,
                            check_update_bias, expert_counts, grouped_mm, grouped_mm_ref, load_balancing_loss,
                            moe_naive, permute, route_deepseek, route_topk_softmax, tile_schedule, unpermute,
                            update_bias)
from minisparse.moe.triton import _launch_dw, _launch_fwd
from minisparse.testing import ExerciseError, assert_close

transformers = pytest.importorskip("transformers", reason="the oracles are transformers' MoE modules")
from transformers import DeepseekV3Config, MixtralConfig, Qwen3NextConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (MixtralSparseMoeBlock, MixtralTopKRouter,  # noqa: E402
                                                          load_balancing_loss_func)

with warnings.catch_warnings():  # qwen3_next imports fla, which warns on a machine without a GPU
    warnings.simplefilter("ignore")
    from transformers.models.qwen3_next.modeling_qwen3_next import (Qwen3NextSparseMoeBlock,  # noqa: E402
                                                                    Qwen3NextTopKRouter)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are tested on a GPU (the interpreter's "
                                                                "bf16 tl.dot is wrong)")
COUNTS = [0, 13, 0, 40, 17]  # 70 rows, 5 experts: two empty, none a multiple of the tile
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)  # several tiles per expert, K-loop of 3 steps


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _by_expert(weights, indices):
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


def _offsets(counts, device=DEV):
    return torch.tensor(counts).cumsum(0).to(torch.int32).to(device)


def _loop(x, w, counts):
    """An independent grouped GEMM: slice by counts, one matmul per expert (fp32 math)."""
    out, start = [], 0
    for g, n in enumerate(counts):
        out.append(x[start:start + n].float() @ w[g].float())
        start += n
    return torch.cat(out)


def _randomize(module, seed):
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in module.named_buffers():
            if "bias" in name:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return module.eval()


# ------------------------------------------------------------------------------------------------- routers
@pytest.mark.parametrize("norm", [True, False])
def test_route_deepseek_matches_transformers_router(norm):
    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=24, num_experts_per_tok=5, n_group=6, topk_group=3,
                           routed_scaling_factor=2.5, norm_topk_prob=norm)
    hf = _randomize(DeepseekV3TopkRouter(cfg), 0)
    x = torch.randn(64, 32, generator=_gen(1))
    logits, w_hf, i_hf = hf(x)
    w, i = route_deepseek(logits, hf.e_score_correction_bias, 5, n_group=6, topk_group=3, routed_scaling_factor=2.5,
                          renormalize=norm)
    (w_hf, i_hf), (w, i) = _by_expert(w_hf, i_hf), _by_expert(w, i)
    assert torch.equal(i, i_hf)
    assert_close("weights", w_hf, w, 1e-6)
    # the bias steers the choice: without it, some tokens pick other experts; the weights never include it
    _, i0 = route_deepseek(logits, None, 5, n_group=6, topk_group=3)
    assert not torch.equal(_by_expert(w, i0)[1], i)


def test_route_deepseek_groups_limit_the_choice():
    logits = torch.randn(200, 16, generator=_gen(2))
    _, idx = route_deepseek(logits, None, 3, n_group=4, topk_group=2)
    groups = idx // 4  # [N, k] group of each chosen expert
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    _, free = route_deepseek(logits, None, 3)
    assert any(len(set(row.tolist())) > 2 for row in free // 4)  # the limit binds on this data


def test_route_topk_softmax_matches_mixtral_and_qwen3_next_routers():
    x = torch.randn(40, 32, generator=_gen(3))
    mix = _randomize(MixtralTopKRouter(MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)), 4)
    logits, w_hf, i_hf = mix(x)
    w, i = route_topk_softmax(logits, 2)
    assert torch.equal(i, i_hf)
    assert_close("mixtral weights", w_hf, w, 1e-6)
    qn = _randomize(Qwen3NextTopKRouter(Qwen3NextConfig(hidden_size=32, num_experts=12, num_experts_per_tok=3,
                                                        norm_topk_prob=False)), 5)
    logits, w_hf, i_hf = qn(x)
    w, i = route_topk_softmax(logits, 3, renormalize=False)
    assert torch.equal(i, i_hf)
    assert_close("qwen3-next weights (no renormalisation)", w_hf, w, 1e-6)
    assert (w.sum(-1) < 1).all()


def test_renormalised_softmax_topk_is_a_softmax_over_the_chosen_logits():
    logits = torch.randn(30, 10, generator=_gen(6))
    w, i = route_topk_softmax(logits, 4)
    assert_close("softmax over the chosen", torch.softmax(logits.gather(1, i), -1), w, 1e-6)


# ------------------------------------------------------------------------------------------------ balancing
def test_load_balancing_loss_matches_transformers():
    logits = torch.randn(100, 8, generator=_gen(7)) + torch.linspace(2, -2, 8)  # unbalanced on purpose
    probs = torch.softmax(logits, -1)
    idx = probs.topk(2, -1).indices
    ours = load_balancing_loss(probs, idx, 8)
    ref = load_balancing_loss_func((logits,), 8, 2)
    assert_close("aux loss", ref, ours, 1e-6)
    assert ours > 2.5  # uniform routing would give top_k = 2
    uniform = torch.full((8, 8), 1 / 8)
    assert_close("uniform", torch.tensor(2.0), load_balancing_loss(uniform, torch.arange(16).view(8, 2) % 8, 8), 1e-6)


def test_update_bias_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    new = update_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)  # mean 5
    assert torch.allclose(new, torch.tensor([-0.1, 0.6, -0.4, 0.1]))
    assert torch.equal(update_bias(bias, torch.tensor([3, 3, 3, 3]), 0.1), bias)  # balanced: unchanged
    with pytest.raises(ValueError, match="tokens_per_expert"):
        update_bias(bias, torch.tensor([1, 2, 3]))


def test_capacity_mask_serves_first_choices_first():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])  # capacity ceil(1.0 * 8 / 4) = 2 rows an expert
    keep = capacity_mask(idx, 4, 1.0)
    # expert 0: first choices of tokens 0, 1 fit; token 2's first choice and token 3's second are dropped.
    # expert 1: token 3's first choice goes before second choices, so token 0's fits and token 2's is dropped.
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert capacity_mask(idx, 4, 2.0).all()


def test_expert_counts():
    assert expert_counts(torch.tensor([[0, 3], [3, 1]]), 5).tolist() == [1, 1, 0, 2, 0]


# ------------------------------------------------------------------------------------------------- dispatch
def test_permute_unpermute_round_trip_and_offsets():
    x = torch.randn(9, 4, generator=_gen(8))
    idx = torch.stack([torch.randperm(6, generator=_gen(s))[:3] for s in range(9)])  # [9, 3], expert 5 maybe empty
    xs, order, offs = permute(x, idx, 7)  # expert 6 certainly empty
    assert offs.dtype == torch.int32 and offs[-1] == 27 and offs[-1] == offs[-2]
    expert_of_row = idx.reshape(-1)[order]
    assert (expert_of_row.diff() >= 0).all()  # sorted by expert
    assert torch.equal(xs, x[order // 3])
    w = torch.rand(9, 3, generator=_gen(9))
    assert_close("combine", x * w.sum(-1, keepdim=True), unpermute(xs, w, order), 1e-6)


def test_moe_naive_matches_transformers_experts_loop():
    block = _randomize(MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=6,
                                                           num_experts_per_tok=2, experts_implementation="eager")), 10)
    x = torch.randn(30, 32, generator=_gen(11))
    _, w, i = block.gate(x)
    ref = block.experts(x, i, w)
    assert_close("moe_naive", ref, moe_naive(x, w, i, block.experts.gate_up_proj, block.experts.down_proj), 1e-6)


# ------------------------------------------------------------------------------------------------ grouped GEMM
def test_tile_schedule_covers_every_row_once_and_never_straddles():
    for counts, bm in [(COUNTS, 16), ([0, 0, 0, 5], 4), ([64, 1, 63, 0, 129], 32), ([1] * 9, 8)]:
        offs = _offsets(counts, "cpu")
        expert, row = tile_schedule(offs, sum(counts), bm)
        assert expert.numel() == -(-sum(counts) // bm) + len(counts)
        covered = torch.zeros(sum(counts), dtype=torch.int64)
        starts = [0] + offs.tolist()[:-1]
        for e, r in zip(expert.tolist(), row.tolist()):
            if e < 0:
                continue
            end = offs[e].item()
            assert starts[e] <= r < end  # starts inside its expert
            covered[r:min(r + bm, end)] += 1  # rows past the expert's end are not its
        assert (covered == 1).all()
        assert (expert[(expert >= 0).sum():] == -1).all()  # unused slots only at the end


@pytest.mark.parametrize("M_K_N, counts", [((70, 48, 40), COUNTS), ((50, 64, 64), [20, 0, 30])])
@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["default-tiles", "16-tiles"])
def test_grouped_mm_forward_every_row_written(M_K_N, counts, config):
    M, K, N = M_K_N
    if config is not None and DEV == "cuda":
        config = dict(config, num_warps=4, num_stages=2)
    g = _gen(12)
    x = torch.randn(M, K, generator=g).to(DEV)
    w = torch.randn(len(counts), K, N, generator=g).to(DEV)
    offs = _offsets(counts)
    y = torch.full((M, N), float("nan"), device=DEV)  # poisoned: a row the kernel skips stays NaN
    _launch_fwd(x, w, offs, y, config=config)
    assert_close("y", _loop(x, w, counts), y, 1e-5)


def test_grouped_mm_result_does_not_depend_on_program_order():
    # A GPU runs programs in any order, the interpreter in launch order. Running the tiles backwards catches a
    # partial tile that writes rows of the next expert (which in launch order the next tile would overwrite).
    g = _gen(17)
    x, w = torch.randn(70, 48, generator=g).to(DEV), torch.randn(5, 48, 40, generator=g).to(DEV)
    offs = _offsets(COUNTS)
    config = SMALL_TILES if DEV == "cpu" else dict(SMALL_TILES, num_warps=4, num_stages=2)
    expert, row = tile_schedule(offs, 70, config["BLOCK_M"])
    y = torch.full((70, 40), float("nan"), device=DEV)
    _launch_fwd(x, w, offs, y, schedule=(expert.flip(0).contiguous(), row.flip(0).contiguous(), config["BLOCK_M"]),
                config=config)
    assert_close("y, tiles in reverse order", _loop(x, w, COUNTS), y, 1e-5)


def test_grouped_mm_forward_and_gradients_vs_loop_fp32():
    M, K, N = 70, 48, 40
    g = _gen(13)
    x = torch.randn(M, K, generator=g).to(DEV).requires_grad_()
    w = torch.randn(5, N, K, generator=g).to(DEV).transpose(1, 2).requires_grad_()  # [G, K, N] strided view
    dy = torch.randn(M, N, generator=g).to(DEV)
    offs = _offsets(COUNTS)
    y = grouped_mm(x, w, offs)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = _loop(xr, wr, COUNTS)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy)
    assert_close("y", yr, y, 1e-5)
    assert_close("dx", dxr, dx, 1e-5)
    assert_close("dw", dwr, dw, 1e-5)
    assert dw.stride() == w.stride()  # the gradient has the weight's layout
    assert (dw[0] == 0).all() and (dw[2] == 0).all()  # empty experts: exactly zero
    assert_close("grouped_mm_ref", yr, grouped_mm_ref(x.detach(), w.detach(), offs), 1e-6)


def test_grouped_mm_weight_gradient_writes_every_expert():
    M, K, N = 70, 48, 40
    g = _gen(14)
    x, dy = torch.randn(M, K, generator=g).to(DEV), torch.randn(M, N, generator=g).to(DEV)
    offs = _offsets(COUNTS)
    for config in (None, dict(BLOCK_K=16, BLOCK_N=16, BLOCK_M=16)):
        dw = torch.full((5, K, N), float("nan"), device=DEV)
        _launch_dw(x, dy, offs, dw, config=config)
        starts = [0] + offs.tolist()[:-1]
        ref = torch.stack([x[s:e].T @ dy[s:e] for s, e in zip(starts, offs.tolist())])
        assert_close("dw", ref, dw, 1e-5)


def test_grouped_mm_matches_torch_grouped_mm():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this PyTorch has no torch._grouped_mm")
    g = _gen(15)
    x = torch.randn(70, 48, generator=g).to(DEV).requires_grad_()
    w = torch.randn(5, 48, 40, generator=g).to(DEV).requires_grad_()
    dy = torch.randn(70, 40, generator=g).to(DEV)
    offs = _offsets(COUNTS)
    try:
        yt = torch._grouped_mm(x, w, offs=offs)
        dxt, dwt = torch.autograd.grad(yt, (x, w), dy)
    except RuntimeError as err:  # e.g. CUDA builds that run it in bf16 only
        pytest.skip(f"torch._grouped_mm does not run in fp32 on {DEV}: {str(err).splitlines()[0][:120]}")
    y = grouped_mm(x, w, offs)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    for name, ref, out in [("y", yt, y), ("dx", dxt, dx), ("dw", dwt, dw)]:
        assert_close(name, ref, out, 1e-5)


@CUDA
@pytest.mark.parametrize("counts", [COUNTS, [300, 0, 1, 511, 212]])
def test_grouped_mm_bf16_on_gpu(counts):
    M, K, N = sum(counts), 256, 192
    g = torch.Generator(device="cuda").manual_seed(16)
    x = torch.randn(M, K, generator=g, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(len(counts), N, K, generator=g, device="cuda") / K ** 0.5).bfloat16().transpose(1, 2)
    w.requires_grad_()
    dy = torch.randn(M, N, generator=g, device="cuda").bfloat16()
    offs = _offsets(counts, "cuda")
    y = grouped_mm(x, w, offs)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()  # same rounded inputs
    yr = _loop(xr, wr, counts)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    assert_close("y bf16", yr, y, 5e-3)
    assert_close("dx bf16", dxr, dx, 8e-3)
    assert_close("dw bf16", dwr, dw, 8e-3)
    try:
        yt = torch._grouped_mm(x.detach(), w.detach(), offs=offs)
    except (RuntimeError, AttributeError) as err:
        pytest.skip(f"torch._grouped_mm unavailable in bf16 here: {str(err).splitlines()[0][:120]}")
    assert_close("y vs torch._grouped_mm", yt.float(), y.float(), 5e-3)


# ------------------------------------------------------------------------------------------------ the layer
def _hf_blocks():
    return {
        "deepseek": _randomize(DeepseekV3MoE(DeepseekV3Config(
            hidden_size=48, moe_intermediate_size=24, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
            topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, experts_implementation="eager")), 20),
        "mixtral": _randomize(MixtralSparseMoeBlock(MixtralConfig(
            hidden_size=48, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
            experts_implementation="eager")), 21),
        "qwen3_next": _randomize(Qwen3NextSparseMoeBlock(Qwen3NextConfig(
            hidden_size=48, moe_intermediate_size=24, num_experts=10, num_experts_per_tok=3,
            shared_expert_intermediate_size=32, experts_implementation="eager")), 22),
    }


@pytest.mark.parametrize("name", ["deepseek", "mixtral", "qwen3_next"])
@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_moe_from_hf_matches_transformers_forward_and_backward(name, backend):
    block = _hf_blocks()[name].to(DEV)
    layer = MoE.from_hf(block, backend=backend)
    assert layer.gate.weight.dtype == torch.float32
    x = torch.randn(2, 13, 48, generator=_gen(23)).to(DEV)
    xh, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = block(xh), layer(xm)
    assert_close(f"{name} output", ref, out, 1e-5)
    dy = torch.randn(ref.shape, generator=_gen(24)).to(DEV)
    ref.backward(dy)
    out.backward(dy)
    assert_close(f"{name} dx", xh.grad, xm.grad, 1e-5)
    ours = dict(layer.named_parameters())
    for pname, p in block.named_parameters():
        assert_close(f"{name} d{pname}", p.grad, ours[pname.replace("shared_expert.", "shared_experts.")].grad, 1e-5)


def test_moe_layer_state_dict_names_are_transformers():
    block = _hf_blocks()["deepseek"]
    layer = MoE.from_hf(block)
    assert set(layer.state_dict()) == set(block.state_dict())


def test_moe_top_k_equal_to_num_experts_is_a_dense_mixture():
    layer = MoE(16, 8, 4, 4, renormalize=True)  # every token uses every expert, weighted by the full softmax
    x = torch.randn(5, 16, generator=_gen(25))
    p = torch.softmax(x @ layer.gate.weight.T, -1)  # [N, E]
    dense = sum(p[:, e:e + 1] * F.linear(F.silu(F.linear(x, layer.experts.gate_up_proj[e][:8])) *
                                         F.linear(x, layer.experts.gate_up_proj[e][8:]), layer.experts.down_proj[e])
                for e in range(4))
    assert_close("dense limit", dense, layer(x), 1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def test_routers_reject_bad_configurations():
    logits = torch.randn(4, 12)
    with pytest.raises(ValueError, match="n_group must .* divides .* E = 12.*n_group=5"):
        route_deepseek(logits, None, 2, n_group=5, topk_group=1)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, E\] with E = 12 .*top_k=13"):
        route_topk_softmax(logits, 13)
    with pytest.raises(ValueError, match="top_k"):
        route_deepseek(logits, None, 13)
    with pytest.raises(ValueError, match=r"topk_group must be .* n_group = 4.*topk_group=5"):
        route_deepseek(logits, None, 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="cannot come from topk_group = 1 groups of 3"):
        route_deepseek(logits, None, 4, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match=r"bias must be .* \[E\] = \(12,\).*\(11,\)"):
        route_deepseek(logits, torch.zeros(11), 2)
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        route_topk_softmax(torch.randn(2, 3, 4), 1)
    with pytest.raises(TypeError, match="floating-point"):
        route_topk_softmax(torch.ones(2, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="top_k"):
        MoE(16, 8, 4, 5)
    with pytest.raises(ValueError, match="n_group"):
        MoE(16, 8, 6, 2, router="deepseek", n_group=4)


def test_grouped_mm_rejects_bad_input():
    x, w = torch.randn(70, 48).to(DEV), torch.randn(5, 48, 40).to(DEV)
    offs = _offsets(COUNTS)
    cases = [
        (dict(offsets=offs.long()), TypeError, "offsets must be torch.int32.*got torch.int64"),
        (dict(offsets=offs.flip(0)), ValueError, "non-decreasing.*first decrease at index"),
        (dict(offsets=torch.tensor([13, 10, 53, 70, 70], dtype=torch.int32, device=DEV)), ValueError,
         "non-decreasing.*index 1"),
        (dict(offsets=torch.tensor([-1, 10, 53, 70, 70], dtype=torch.int32, device=DEV)), ValueError,
         "starting at >= 0.*index 0"),
        (dict(offsets=_offsets([0, 13, 0, 40, 16])), ValueError,
         r"last offset must equal M = x.shape\[0\] = 70 .*got 69"),
        (dict(offsets=offs[:-1]), ValueError, r"one entry per expert.*len\(offsets\) = 4"),
        (dict(offsets=offs[None]), ValueError, "offsets must be 1-D"),
        (dict(x=x[:, :47]), ValueError, r"must share K, got x \(70, 47\)"),
        (dict(x=x.double(), w=w.double()), TypeError, "float32, float16, bfloat16.*float64"),
        (dict(x=x.half()), TypeError, "x torch.float16 and w torch.float32"),
        (dict(x=x[None]), ValueError, r"x must be 2-D \[M, K\]"),
        (dict(w=w[0]), ValueError, r"w must be 3-D \[G, K, N\]"),
    ]
    for change, err, msg in cases:
        args = dict(x=x, w=w, offsets=offs) | change
        with pytest.raises(err, match=msg):
            grouped_mm(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_grouped_mm_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grouped_mm(torch.randn(70, 48), torch.randn(5, 48, 40), _offsets(COUNTS, "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_grouped_mm_refuses_bf16_in_the_interpreter():
    with pytest.raises(TypeError, match="bfloat16 under the Triton interpreter"):
        grouped_mm(torch.randn(70, 48).bfloat16(), torch.randn(5, 48, 40).bfloat16(), _offsets(COUNTS, "cpu"))


def test_permute_rejects_bad_indices():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_experts\) = \[0, 4\), got values in \[0, 4\]"):
        permute(torch.randn(3, 2), torch.tensor([[0, 4], [1, 2], [3, 3]]), 4)
    with pytest.raises(ValueError, match="same N"):
        permute(torch.randn(3, 2), torch.tensor([[0, 1]]), 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        permute(torch.randn(1, 2), torch.tensor([[0.0, 1.0]]), 4)


# ------------------------------------------------------------------------------------------------ exercises
def test_exercise_checkers_accept_the_reference(capsys):
    from minisparse.moe import exercises as ex

    check_route_topk_softmax(route_topk_softmax)
    check_update_bias(update_bias)
    check_unpermute(unpermute)
    check_tile_schedule(ex._tiles)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("✓") for line in lines)


def _always_renormalise(logits, top_k, renormalize=True):
    return route_topk_softmax(logits, top_k, True)


def _unstable_softmax(logits, top_k, renormalize=True):
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)  # overflows for logits near 100
    w, i = p.topk(top_k, -1)
    return (w / w.sum(-1, keepdim=True) if renormalize else w), i


def _global_tiles(counts, block_m):  # a plain matmul's tiling: tiles straddle experts
    starts = torch.tensor([0] + counts).cumsum(0).tolist()
    owner = lambda r: max(e for e in range(len(counts)) if starts[e] <= r and counts[e])  # noqa: E731
    return [(owner(r), r) for r in range(0, sum(counts), block_m)]


def _tiles_for_empty_experts_too(counts, block_m):
    tiles, start = [], 0
    for e, n in enumerate(counts):
        tiles += [(e, r) for r in range(start, start + max(n, 1), block_m)]
        start += n
    return tiles


@pytest.mark.parametrize("checker, wrong", [
    (check_route_topk_softmax, _always_renormalise),
    (check_route_topk_softmax, _unstable_softmax),
    (check_route_topk_softmax, lambda logits, k, r=True: route_topk_softmax(-logits, k, r)),  # picks the worst
    (check_update_bias, lambda b, c, rate=1e-3: b + rate * torch.sign(c.float() - c.float().mean())),  # flipped
    (check_update_bias, lambda b, c, rate=1e-3: b + rate * (c.float().mean() - c.float())),  # no sign
    (check_update_bias, lambda b, c, rate=1e-3: b.add_(rate * torch.sign(c.float().mean() - c.float()))),  # in place
    (check_unpermute, lambda ys, w, order: (ys[order].view(*w.shape, -1) * w[..., None]).sum(1)),  # wrong direction
    (check_unpermute, lambda ys, w, order: unpermute(ys, torch.ones_like(w), order)),  # unweighted
    (check_tile_schedule, _global_tiles),
    (check_tile_schedule, _tiles_for_empty_experts_too),
], ids=["router-always-renormalises", "router-unstable-exp", "router-picks-worst", "bias-flipped", "bias-no-sign", "bias-in-place",
        "unpermute-wrong-direction", "unpermute-unweighted", "tiles-straddle", "tiles-for-empty-experts"])
def test_exercise_checkers_reject_wrong_answers(checker, wrong):
    with pytest.raises(ExerciseError, match="✗"):
        checker(wrong)


def test_exercise_checkers_report_a_stub_as_not_implemented():
    def stub(*args):
        raise NotImplementedError

    for checker in (check_route_topk_softmax, check_update_bias, check_unpermute, check_tile_schedule):
        with pytest.raises(ExerciseError, match="not implemented yet"):
            checker(stub)


def test_package_exports_the_api():
    assert minisparse.moe.__all__[:1] and {"route_topk_softmax", "route_deepseek", "update_bias",
                                           "load_balancing_loss", "grouped_mm", "permute", "unpermute",
                                           "MoE"} <= set(minisparse.moe.__all__)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_moe_layer_on_an_empty_batch(backend):
    dev = DEV if backend == "triton" else "cpu"
    layer = MoE(16, 32, 8, 2, backend=backend).to(dev)
    x = torch.randn(0, 16, device=dev, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 16)
    if backend == "triton":  # the sorted path keeps the (empty) graph; the naive loop returns a constant
        y.sum().backward()


def test_balancing_and_dispatch_helpers_reject_bad_input():
    from minisparse.moe import expert_counts, unpermute

    idx = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        load_balancing_loss(torch.full((2, 4), 0.25), idx + 1, 4)
    with pytest.raises(TypeError, match="integer"):
        expert_counts(idx.float(), 4)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        capacity_mask(idx, 4, 0.0)
    with pytest.raises(TypeError, match="floating-point"):
        update_bias(torch.zeros(4, dtype=torch.long), torch.ones(4))
    with pytest.raises(ValueError, match=r"weights must be \[N, k\]"):
        unpermute(torch.zeros(4, 3), torch.ones(4), torch.arange(4))
