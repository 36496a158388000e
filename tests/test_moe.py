"""minisparse.moe (chapter 2): routers and balancing vs transformers, dispatch, the Triton grouped GEMM vs a loop and
vs torch._grouped_mm (forward and both gradients), the MoE layer vs transformers' blocks, bad input, the checkers.

On a CPU the kernels run in Triton's interpreter in fp32 at small shapes (M=70, K=48, N=40, 5 experts, two of them
empty); on a GPU the same tests run on CUDA, plus bf16 versions against an fp32 reference from the same rounded
inputs (fwd ≤ 5e-3, grads ≤ 8e-3 relative RMS). Kernel outputs start as NaN (the `poisoned` fixture), so a row or an
expert a kernel forgets to write fails the comparison.
"""
import contextlib
import functools
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minisparse
from minisparse import runtime
from minisparse.moe import (MoE, capacity_mask, check_dropped_fraction, check_expected_groups,
                            check_grouped_tile, check_unpermute, expert_counts, grouped_mm, grouped_mm_ref,
                            load_balancing_loss, moe_naive, permute, route_deepseek, route_topk_softmax,
                            tile_schedule, unpermute, update_bias)
from minisparse.moe.triton import _launch_dw, _launch_fwd
from minisparse.testing import ExerciseError, assert_close, with_constexprs

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
TILES_16 = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)  # several tiles per expert, a K-loop of 3 steps
DW_TILES_16 = dict(BLOCK_K=16, BLOCK_N=16, BLOCK_M=16)


def _tiles(kernel, config):
    """Force `config` on `kernel` (runtime.launch_config), or the table's own row for None."""
    return contextlib.nullcontext() if config is None else runtime.launch_config(kernel, **config)


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


def test_route_deepseek_groups_of_one_expert_are_the_plain_top_k():
    """transformers' group score (a top-2 in each group) has no meaning for groups of one expert; here a group's
    score is then its expert's, so the limit keeps the topk_group best experts and the top-k is unchanged."""
    logits, bias = torch.randn(100, 8, generator=_gen(7)), 0.3 * torch.randn(8, generator=_gen(8))
    w, i = route_deepseek(logits, bias, 3, n_group=8, topk_group=4)
    w0, i0 = route_deepseek(logits, bias, 3)
    assert torch.equal(i, i0) and torch.equal(w, w0)


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
@pytest.mark.parametrize("tiles", [None, TILES_16], ids=["table-tiles", "16-tiles"])
def test_grouped_mm_forward_every_row_written(poisoned, M_K_N, counts, tiles):
    M, K, N = M_K_N
    g = _gen(12)
    x = torch.randn(M, K, generator=g).to(DEV)
    w = torch.randn(len(counts), K, N, generator=g).to(DEV)
    with _tiles("moe.grouped_mm", tiles):
        y = grouped_mm(x, w, _offsets(counts))  # y starts as NaN: a row the kernel skips stays NaN
    assert_close("y", _loop(x, w, counts), y, 1e-5)


def _reference_and_poisoned_output(seed=17):
    g = _gen(seed)
    x, w = torch.randn(70, 48, generator=g).to(DEV), torch.randn(5, 48, 40, generator=g).to(DEV)
    return x, w, _loop(x, w, COUNTS), torch.full((70, 40), float("nan"), device=DEV)


def test_grouped_mm_result_does_not_depend_on_program_order():
    # A GPU runs programs in any order, the interpreter in launch order. Running the tiles backwards catches a
    # partial tile that writes rows of the next expert (which in launch order the next tile would overwrite).
    x, w, ref, y = _reference_and_poisoned_output()
    offs = _offsets(COUNTS)
    expert, row = tile_schedule(offs, 70, 16)
    with runtime.launch_config("moe.grouped_mm", **TILES_16):
        _launch_fwd(x, w, offs, y, (expert.flip(0).contiguous(), row.flip(0).contiguous()), 16)
    assert_close("y, tiles in reverse order", ref, y, 1e-5)


def test_moe_naive_refuses_expert_ids_out_of_range():
    x, gu, dn = torch.randn(2, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 3)
    for bad in ([[5], [0]], [[1], [-1]]):  # not dropped (a zero output)
        with pytest.raises(ValueError, match="moe_naive: indices .*expert ids for num_experts = 2"):
            moe_naive(x, torch.ones(2, 1), torch.tensor(bad), gu, dn)


def test_router_and_experts_built_alone_are_initialised_and_checked():
    """Router, Experts and SwiGLU outside MoE: Normal(0, 0.02) weights, sizes > 0,
    and Experts.forward's backend one of 'naive' and 'triton' (it is given the resolved one)."""
    from minisparse.moe.layer import Experts, Router, SwiGLU

    torch.manual_seed(0)
    for p in (*Router(64, 16, 2).parameters(), *Experts(16, 64, 32).parameters()):
        assert torch.isfinite(p).all() and 0.015 < p.std().item() < 0.025
    for build, message in ((lambda: Experts(0, 4, 4), "Experts: num_experts must be an int > 0"),
                           (lambda: Experts(2, 4, -1), "Experts: intermediate_size must be an int > 0"),
                           (lambda: SwiGLU(0, 0), "SwiGLU: hidden_size must be an int > 0")):
        with pytest.raises(ValueError, match=message):
            build()
    with pytest.raises(ValueError, match="Experts: backend must be one of 'naive', 'triton', got 'auto'"):
        Experts(2, 4, 4)(torch.randn(3, 4), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long), "auto")


def test_grouped_mm_takes_offsets_that_are_a_strided_view():
    """offsets a column of a wider tensor (stride 2): the kernels read them as given, not one int32
    apart."""
    x = torch.randn(5, 16, device=DEV, requires_grad=True)
    w = torch.randn(2, 16, 16, device=DEV, requires_grad=True)
    offs = torch.tensor([[2, 0], [5, 0]], dtype=torch.int32, device=DEV)[:, 0]
    assert not offs.is_contiguous()
    y, ref = grouped_mm(x, w, offs), grouped_mm_ref(x, w, offs.contiguous())
    assert_close("y", ref, y, 1e-5)
    do = torch.randn(y.shape, device=DEV)
    for got, want, name in zip(torch.autograd.grad(y, (x, w), do), torch.autograd.grad(ref, (x, w), do), "xw"):
        assert_close(f"d{name}", want, got, 1e-5)


def test_a_schedule_whose_tiles_straddle_experts_is_caught():
    """The known-wrong variant: a plain matmul's tiling, tile s = rows 16·s … 16·s + 15 with the expert of its first
    row. Rows of the next expert get the wrong weights or stay unwritten; the comparison with the loop must fail."""
    x, w, ref, y = _reference_and_poisoned_output()
    offs = _offsets(COUNTS)
    rows = torch.arange(0, 70, 16, device=DEV)
    owner = torch.searchsorted(offs.long(), rows, right=True)  # the expert that owns each tile's first row
    with runtime.launch_config("moe.grouped_mm", **TILES_16):
        _launch_fwd(x, w, offs, y, (owner.to(torch.int32), rows.to(torch.int32)), 16)
    with pytest.raises(AssertionError):
        assert_close("y, straddling tiles", ref, y, 1e-5)


def test_forced_block_m_builds_the_schedule():
    """BLOCK_M is the schedule's tile height: a forced configuration's BLOCK_M must be the one the schedule uses
    (here 16 instead of the table's), or rows would be missed."""
    x, w, ref, _ = _reference_and_poisoned_output()
    table_m = runtime.launch_configs("moe.grouped_mm", x.device, x.dtype)[0]["BLOCK_M"]
    for block_m in sorted({16, table_m}):
        with runtime.launch_config("moe.grouped_mm", **dict(TILES_16, BLOCK_M=block_m)):
            assert_close(f"y, BLOCK_M = {block_m}", ref, grouped_mm(x, w, _offsets(COUNTS)), 1e-5)


@pytest.mark.parametrize("tiles", [None, TILES_16], ids=["table-tiles", "16-tiles"])
def test_grouped_mm_forward_and_gradients_vs_loop_fp32(poisoned, tiles):
    M, K, N = 70, 48, 40
    g = _gen(13)
    x = torch.randn(M, K, generator=g).to(DEV).requires_grad_()
    w = torch.randn(5, N, K, generator=g).to(DEV).transpose(1, 2).requires_grad_()  # [G, K, N] strided view
    dy = torch.randn(M, N, generator=g).to(DEV)
    offs = _offsets(COUNTS)
    with _tiles("moe.grouped_mm", tiles), _tiles("moe.grouped_mm_dw", tiles and DW_TILES_16):
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


@pytest.mark.parametrize("tiles", [None, DW_TILES_16], ids=["table-tiles", "16-tiles"])
def test_grouped_mm_weight_gradient_writes_every_expert(tiles):
    M, K, N = 70, 48, 40
    g = _gen(14)
    x, dy = torch.randn(M, K, generator=g).to(DEV), torch.randn(M, N, generator=g).to(DEV)
    offs = _offsets(COUNTS)
    dw = torch.full((5, K, N), float("nan"), device=DEV)  # an expert the kernel skips stays NaN
    with _tiles("moe.grouped_mm_dw", tiles):
        _launch_dw(x, dy, offs, dw)
    starts = [0] + offs.tolist()[:-1]
    ref = torch.stack([x[s:e].T @ dy[s:e] for s, e in zip(starts, offs.tolist())])
    assert_close("dw", ref, dw, 1e-5)


def test_grouped_mm_offsets_check_follows_the_value_check_rule(value_checks):
    """The offsets check reads them back to the host: on CPU tensors always, on CUDA tensors only after
    runtime.set_value_checks(True); check_values=False skips it everywhere. The shape checks stay on."""
    x, w, _, _ = _reference_and_poisoned_output()
    short = _offsets([0, 13, 0, 40, 16])  # ends at 69, not M = 70
    value_checks(False)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="last offset must equal M"):
            grouped_mm(x, w, short)
    else:
        grouped_mm(x, w, short)  # no host read, no check
    value_checks(True)
    with pytest.raises(ValueError, match="last offset must equal M"):
        grouped_mm(x, w, short)
    grouped_mm(x, w, short, check_values=False)
    with pytest.raises(ValueError, match="one entry per expert"):
        grouped_mm(x, w, short[:-1], check_values=False)


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


def test_moe_from_hf_names_the_module_it_expects():
    """A block without what the loader reads fails at once, naming the expected blocks: a block whose experts lack
    act_fn, or a DeepSeek router without its group settings, was an AttributeError from inside the loader."""
    expected = (r"MoE.from_hf: module must be a transformers MoE block with 3-D expert tensors \(DeepseekV3MoE, "
                r"MixtralSparseMoeBlock, Qwen3NextSparseMoeBlock\), got ")
    blocks = _hf_blocks()
    del blocks["mixtral"].experts.act_fn
    del blocks["deepseek"].gate.num_group
    for module, what in ((blocks["mixtral"], r"MixtralSparseMoeBlock \(it has no experts.act_fn\)"),
                         (blocks["deepseek"], r"DeepseekV3MoE \(it has no gate.num_group\)"),
                         (blocks["qwen3_next"].experts, r"Qwen3NextExperts \(it has no gate.weight, gate.top_k"),
                         (torch.nn.Linear(4, 4), r"Linear \(it has no gate.weight")):
        with pytest.raises(TypeError, match=expected + what):
            MoE.from_hf(module)

def test_moe_top_k_equal_to_num_experts_is_a_dense_mixture():
    layer = MoE(16, 8, 4, 4, renormalize=True)  # every token uses every expert, weighted by the full softmax
    x = torch.randn(5, 16, generator=_gen(25))
    p = torch.softmax(x @ layer.gate.weight.T, -1)  # [N, E]
    dense = sum(p[:, e:e + 1] * F.linear(F.silu(F.linear(x, layer.experts.gate_up_proj[e][:8])) *
                                         F.linear(x, layer.experts.gate_up_proj[e][8:]), layer.experts.down_proj[e])
                for e in range(4))
    assert_close("dense limit", dense, layer(x), 1e-5)


def test_moe_auto_backend_runs_fp64_naively():
    """backend="auto" falls back to the PyTorch experts for fp64 (the kernels take fp32/fp16/bf16 only)."""
    torch.manual_seed(26)
    auto, naive = MoE(16, 8, 4, 2).double().to(DEV), MoE(16, 8, 4, 2, backend="naive").double().to(DEV)
    naive.load_state_dict(auto.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64, device=DEV)
    with torch.no_grad():
        y = auto(x)
        assert y.dtype == torch.float64
        assert_close("fp64 auto", naive(x), y, 1e-12)


# ------------------------------------------------------------------------------------------------ bad input
def _nan_at(t, *index):
    t = t.clone()
    t[index] = float("nan")
    return t


# Each row: (what is wrong, a change to the good arguments, the exception, words of its message).
ROUTER_BAD = [  # both routers
    ("logits 3-D", lambda a: a.update(logits=torch.randn(2, 3, 12)), ValueError, r"logits must be 2-D \[N, E\]"),
    ("integer logits", lambda a: a.update(logits=a["logits"].long()), TypeError, "logits must be one of float32"),
    ("logits a list", lambda a: a.update(logits=a["logits"].tolist()), TypeError, "logits must be a torch.Tensor"),
    ("top_k > E", lambda a: a.update(top_k=13), ValueError, "top_k must be <= the number of experts E = 12, got 13"),
    ("top_k 0", lambda a: a.update(top_k=0), ValueError, "top_k must be an int > 0, got 0"),
    ("top_k float", lambda a: a.update(top_k=2.0), ValueError, "top_k must be an int > 0, got 2.0"),
    ("NaN logit", lambda a: a.update(logits=_nan_at(a["logits"], 1, 3)), ValueError, r"logits contains NaN \(1 of 48"),
]
ROUTERS = [pytest.param(route_topk_softmax, id="softmax"),
           pytest.param(functools.partial(route_deepseek, bias=None), id="deepseek")]
DEEPSEEK_BAD = [  # route_deepseek's groups, bias and scale
    ("n_group does not divide E", lambda a: a.update(n_group=5), ValueError,
     "n_group = 5 must divide the number of experts E = 12"),
    ("n_group 0", lambda a: a.update(n_group=0), ValueError, "n_group must be an int > 0, got 0"),
    ("topk_group > n_group", lambda a: a.update(n_group=4, topk_group=5), ValueError,
     "topk_group must be <= n_group = 4 .*got 5"),
    ("groups too small for top_k", lambda a: a.update(top_k=4, n_group=4, topk_group=1), ValueError,
     "top_k = 4 experts cannot come from topk_group = 1 groups of 3"),
    ("bias shape", lambda a: a.update(bias=torch.zeros(11)), ValueError, r"bias must be \[E\] = \(12,\).*got \(11,\)"),
    ("integer bias", lambda a: a.update(bias=torch.zeros(12, dtype=torch.long)), TypeError, "bias must be one of"),
    ("NaN bias", lambda a: a.update(bias=_nan_at(torch.zeros(12), 5)), ValueError, "bias contains NaN"),
    ("scale 0", lambda a: a.update(routed_scaling_factor=0.0), ValueError,
     "routed_scaling_factor must be a positive number, got 0.0"),
]


def _router_args():
    return dict(logits=torch.randn(4, 12, generator=_gen(30)), top_k=2)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("desc, change, exc, words", ROUTER_BAD, ids=[b[0] for b in ROUTER_BAD])
def test_routers_reject_bad_input(router, desc, change, exc, words):
    args = _router_args()
    change(args)
    with pytest.raises(exc, match=words):
        router(**args)


@pytest.mark.parametrize("desc, change, exc, words", DEEPSEEK_BAD, ids=[b[0] for b in DEEPSEEK_BAD])
def test_route_deepseek_rejects_bad_input(desc, change, exc, words):
    args = dict(_router_args(), bias=torch.zeros(12))
    change(args)
    with pytest.raises(exc, match=words):
        route_deepseek(**args)


def test_a_nan_bias_would_send_every_token_to_its_expert():
    """Why the NaN check of the bias: top-k ranks NaN first, so unchecked, every token picks that expert."""
    logits, bias = torch.randn(50, 12, generator=_gen(31)), _nan_at(torch.zeros(12), 5)
    scores = torch.sigmoid(logits) + bias
    assert (scores.topk(2, dim=-1).indices == 5).any(dim=-1).all()
    with pytest.raises(ValueError, match="bias contains NaN"):
        route_deepseek(logits, bias, 2)


def _inf_at(t, value, *index):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize("desc, logits, words", [
    ("a row of -inf", _inf_at(torch.randn(4, 12, generator=_gen(33)), float("-inf"), 2),
     r"finite maximum in every row .*got 1 of 4 rows without one \(first: row 2, max -inf\)"),
    ("a +inf logit", _inf_at(torch.randn(4, 12, generator=_gen(33)), float("inf"), 1, 5),
     r"finite maximum in every row .*got 1 of 4 rows without one \(first: row 1, max inf\)"),
], ids=["row of -inf", "+inf logit"])
def test_route_topk_softmax_rejects_rows_without_a_finite_maximum(desc, logits, words):
    """Softmax over a row of -inf (no expert allowed) or over a +inf is NaN: unchecked, the token's weights were NaN."""
    with pytest.raises(ValueError, match=words):
        route_topk_softmax(logits, 2)


def test_routers_with_minus_inf_logits():
    """-inf logits that mask some experts are fine for softmax routing (those experts get weight 0 and are never
    picked); sigmoid routing is defined for a row of -inf too: scores 0, so the token's weights are 0, as in
    transformers' DeepseekV3 (its 1e-20 in the renormalisation)."""
    logits = _inf_at(torch.randn(4, 12, generator=_gen(34)), float("-inf"), slice(None), slice(0, 9))
    w, idx = route_topk_softmax(logits, 2)
    assert torch.isfinite(w).all() and (idx >= 9).all()
    w, idx = route_deepseek(_inf_at(logits, float("-inf"), 1), None, 2, n_group=4, topk_group=2)
    assert torch.isfinite(w).all() and (w[1] == 0).all() and (w[[0, 2, 3]] > 0).all()


def _gmm_args():
    g = _gen(32)
    return dict(x=torch.randn(70, 48, generator=g).to(DEV), w=torch.randn(5, 48, 40, generator=g).to(DEV),
                offsets=_offsets(COUNTS))


GMM_BAD = [  # grouped_mm_ref (the spec) and grouped_mm (Triton)
    ("int64 offsets", lambda a: a.update(offsets=a["offsets"].long()), TypeError,
     "offsets must be torch.int32.*got torch.int64"),
    ("offsets reversed", lambda a: a.update(offsets=a["offsets"].flip(0)), ValueError,
     "non-decreasing.*first decrease at index"),
    ("offsets decrease at 1", lambda a: a.update(offsets=torch.tensor([13, 10, 53, 70, 70], dtype=torch.int32,
                                                                       device=DEV)), ValueError,
     "non-decreasing.*index 1"),
    ("negative offset", lambda a: a.update(offsets=torch.tensor([-1, 10, 53, 70, 70], dtype=torch.int32,
                                                                 device=DEV)), ValueError, "starting at >= 0.*index 0"),
    ("last offset short of M", lambda a: a.update(offsets=_offsets([0, 13, 0, 40, 16])), ValueError,
     r"last offset must equal M = x.shape\[0\] = 70 .*got 69"),
    ("one offset short", lambda a: a.update(offsets=a["offsets"][:-1]), ValueError,
     r"one entry per expert.*len\(offsets\) = 4"),
    ("offsets 2-D", lambda a: a.update(offsets=a["offsets"][None]), ValueError, r"offsets must be 1-D \[G\]"),
    ("K mismatch", lambda a: a.update(x=a["x"][:, :47]), ValueError, r"must share K, got x \(70, 47\)"),
    ("mixed dtypes", lambda a: a.update(x=a["x"].half()), TypeError,
     "x, w must share one dtype.*x torch.float16, w torch.float32"),
    ("integer x and w", lambda a: a.update(x=a["x"].long(), w=a["w"].long()), TypeError, "x must be one of float32"),
    ("x 3-D", lambda a: a.update(x=a["x"][None]), ValueError, r"x must be 2-D \[M, K\]"),
    ("w 2-D", lambda a: a.update(w=a["w"][0]), ValueError, r"w must be 3-D \[G, K, N\]"),
    ("x a list", lambda a: a.update(x=a["x"].tolist()), TypeError, "x must be a torch.Tensor"),
]
GMM_TRITON_BAD = [  # what only the kernels refuse
    ("float64", lambda a: a.update(x=a["x"].double(), w=a["w"].double()), TypeError,
     "x must be one of float32, float16, bfloat16, got torch.float64"),
]


@pytest.mark.parametrize("op", [grouped_mm_ref, grouped_mm], ids=lambda f: f.__name__)
@pytest.mark.parametrize("desc, change, exc, words", GMM_BAD, ids=[b[0] for b in GMM_BAD])
def test_grouped_mm_rejects_bad_input(value_checks, op, desc, change, exc, words):
    args = _gmm_args()
    change(args)
    with pytest.raises(exc, match=words):
        op(**args)


@pytest.mark.parametrize("desc, change, exc, words", GMM_TRITON_BAD, ids=[b[0] for b in GMM_TRITON_BAD])
def test_grouped_mm_kernel_limits(desc, change, exc, words):
    args = _gmm_args()
    change(args)
    with pytest.raises(exc, match=words):
        grouped_mm(**args)
    change(good := _gmm_args())
    assert_close(desc, _loop(good["x"], good["w"], COUNTS), grouped_mm_ref(**good), 1e-6)  # the spec takes it


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_grouped_mm_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grouped_mm(torch.randn(70, 48), torch.randn(5, 48, 40), _offsets(COUNTS, "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_grouped_mm_refuses_bf16_in_the_interpreter():
    with pytest.raises(TypeError, match="bfloat16 under the Triton interpreter"):
        grouped_mm(torch.randn(70, 48).bfloat16(), torch.randn(5, 48, 40).bfloat16(), _offsets(COUNTS, "cpu"))


PERMUTE_BAD = [
    ("expert id = E", lambda a: a.update(indices=torch.tensor([[0, 4], [1, 2], [3, 3]])), ValueError,
     r"indices must be >= 0 and <= 3 \(expert ids for num_experts = 4\), got values in \[0, 4\]"),
    ("negative expert id", lambda a: a.update(indices=torch.tensor([[0, -1], [1, 2], [3, 3]])), ValueError,
     r"got values in \[-1, 3\]"),
    ("indices for another N", lambda a: a.update(indices=torch.tensor([[0, 1]])), ValueError,
     r"indices must be \[N, k\] with x's N = 3 tokens, got \(1, 2\)"),
    ("float indices", lambda a: a.update(indices=a["indices"].float()), TypeError,
     "indices must be one of int32, int64, got torch.float32"),
    ("indices 1-D", lambda a: a.update(indices=torch.tensor([0, 1, 2])), ValueError, r"indices must be 2-D \[N, k\]"),
    ("x 1-D", lambda a: a.update(x=torch.randn(3)), ValueError, r"x must be 2-D \[N, H\]"),
    ("num_experts 0", lambda a: a.update(num_experts=0), ValueError, "num_experts must be an int > 0, got 0"),
]


@pytest.mark.parametrize("desc, change, exc, words", PERMUTE_BAD, ids=[b[0] for b in PERMUTE_BAD])
def test_permute_rejects_bad_input(desc, change, exc, words):
    args = dict(x=torch.randn(3, 2), indices=torch.tensor([[0, 1], [1, 2], [3, 3]]), num_experts=4)
    change(args)
    with pytest.raises(exc, match=words):
        permute(**args)


UNPERMUTE_BAD = [
    ("weights 1-D", lambda a: a.update(weights=a["weights"][:, 0]), ValueError, r"weights must be 2-D \[N, k\]"),
    ("integer weights", lambda a: a.update(weights=a["weights"].long()), TypeError, "weights must be one of"),
    ("a row short", lambda a: a.update(y_sorted=a["y_sorted"][:-1]), ValueError,
     r"y_sorted must be \[N\*k, H\] with N\*k = 6"),
    ("order short", lambda a: a.update(order=a["order"][:-1]), ValueError, r"order must be \[N\*k\] = \(6,\)"),
    ("float order", lambda a: a.update(order=a["order"].float()), TypeError, "order must be one of int32, int64"),
]


@pytest.mark.parametrize("desc, change, exc, words", UNPERMUTE_BAD, ids=[b[0] for b in UNPERMUTE_BAD])
def test_unpermute_rejects_bad_input(desc, change, exc, words):
    x_sorted, order, _ = permute(torch.randn(3, 2), torch.tensor([[0, 1], [1, 2], [3, 3]]), 4)
    args = dict(y_sorted=x_sorted, weights=torch.rand(3, 2), order=order)
    change(args)
    with pytest.raises(exc, match=words):
        unpermute(**args)


HELPERS_BAD = [  # balancing and dispatch helpers: (what, the call, exception, words)
    ("load balancing: expert id = E",
     lambda: load_balancing_loss(torch.full((2, 4), 0.25), torch.tensor([[1, 2], [3, 4]]), 4), ValueError,
     r"indices must be >= 0 and <= 3"),
    ("load balancing: probs for other experts",
     lambda: load_balancing_loss(torch.full((2, 5), 0.2), torch.tensor([[0, 1], [2, 3]]), 4), ValueError,
     r"router_probs must be \[N, E\] = \(2, 4\)"),
    ("load balancing: indices for other tokens",
     lambda: load_balancing_loss(torch.full((2, 4), 0.25), torch.tensor([[0, 1]]), 4), ValueError,
     r"indices must be \[N, k\] = \(2, 2\)"),
    ("counts: float ids", lambda: expert_counts(torch.tensor([[0.0, 1.0]]), 4), TypeError,
     "indices must be one of int32, int64"),
    ("counts: id = E", lambda: expert_counts(torch.tensor([[0, 4]]), 4), ValueError, r"got values in \[0, 4\]"),
    ("capacity factor 0", lambda: capacity_mask(torch.tensor([[0, 1], [2, 3]]), 4, 0.0), ValueError,
     "capacity_factor .* must be a positive number, got 0.0"),
    ("bias update: integer bias", lambda: update_bias(torch.zeros(4, dtype=torch.long), torch.ones(4)), TypeError,
     "bias must be one of"),
    ("bias update: counts for other experts", lambda: update_bias(torch.zeros(4), torch.tensor([1, 2, 3])),
     ValueError, r"tokens_per_expert must be \[E\] = \(4,\)"),
]


@pytest.mark.parametrize("desc, call, exc, words", HELPERS_BAD, ids=[b[0] for b in HELPERS_BAD])
def test_balancing_and_dispatch_helpers_reject_bad_input(desc, call, exc, words):
    with pytest.raises(exc, match=words):
        call()


MOE_ARGS = dict(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
MOE_BAD_ARGS = [
    ("hidden_size 0", dict(hidden_size=0), ValueError, "MoE: hidden_size must be an int > 0, got 0"),
    ("intermediate_size float", dict(intermediate_size=8.0), ValueError, "MoE: intermediate_size must be an int > 0"),
    ("num_experts True", dict(num_experts=True), ValueError, "MoE: num_experts must be an int > 0, got True"),
    ("top_k > num_experts", dict(top_k=5), ValueError, "MoE: top_k must be <= the number of experts E = 4, got 5"),
    ("top_k 0", dict(top_k=0), ValueError, "MoE: top_k must be an int > 0, got 0"),
    ("unknown router", dict(router="sinkhorn"), ValueError,
     "MoE: router must be one of 'softmax', 'deepseek', got 'sinkhorn'"),
    ("n_group does not divide", dict(router="deepseek", n_group=3), ValueError,
     "MoE: n_group = 3 must divide the number of experts E = 4"),
    ("topk_group > n_group", dict(router="deepseek", n_group=2, topk_group=3), ValueError,
     "MoE: topk_group must be <= n_group = 2"),
    ("groups too small", dict(router="deepseek", n_group=4, topk_group=1), ValueError,
     "MoE: top_k = 2 experts cannot come from topk_group = 1 groups of 1"),
    ("scale negative", dict(routed_scaling_factor=-1.0), ValueError, "MoE: routed_scaling_factor must be a positive"),
    ("shared size negative", dict(shared_intermediate_size=-8), ValueError,
     r"MoE: shared_intermediate_size \(0: no shared expert\) must be an int >= 0, got -8"),
    ("gate without shared expert", dict(shared_expert_gate=True), ValueError,
     "shared_expert_gate=True needs a shared expert"),
    ("backend name", dict(backend="flash"), ValueError, "MoE: backend must be 'auto', 'naive' or 'triton', got 'flash'"),
]


@pytest.mark.parametrize("desc, change, exc, words", MOE_BAD_ARGS, ids=[b[0] for b in MOE_BAD_ARGS])
def test_moe_rejects_bad_constructor_arguments(desc, change, exc, words):
    with pytest.raises(exc, match=words):
        MoE(**(MOE_ARGS | change))


def test_moe_backend_is_checked_when_assigned_too():
    layer = MoE(**MOE_ARGS)
    layer.backend = "naive"
    with pytest.raises(ValueError, match="MoE: backend must be 'auto', 'naive' or 'triton', got 'ref'"):
        layer.backend = "ref"
    assert layer.backend == "naive"


MOE_BAD_INPUT = [
    ("fp16 into an fp32 layer", lambda: torch.randn(2, 3, 16, device=DEV).half(), TypeError,
     "MoE: x is torch.float16 but the layer's parameters are torch.float32"),
    ("wrong hidden size", lambda: torch.randn(2, 3, 15, device=DEV), ValueError,
     r"MoE: x must be \[B, T, hidden\] with hidden = 16, got \(2, 3, 15\)"),
    ("4-D input", lambda: torch.randn(1, 2, 3, 16, device=DEV), ValueError, r"MoE: x must be 3-D \[B, T, hidden\]"),
    ("a list", lambda: [[0.0] * 16], TypeError, "MoE: x must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["naive", "triton"])
@pytest.mark.parametrize("desc, make, exc, words", MOE_BAD_INPUT, ids=[b[0] for b in MOE_BAD_INPUT])
def test_moe_rejects_bad_input(backend, desc, make, exc, words):
    layer = MoE(**MOE_ARGS, backend=backend).to(DEV)
    with pytest.raises(exc, match=words):
        layer(make())


# ------------------------------------------------------------------------------------------------ exercises
import math  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _dropped(shares, cf):
    return sum(max(0.0, p - cf / len(shares)) for p in shares)


def _groups(E, G, k):
    return G * (1 - math.comb(E - E // G, k) / math.comb(E, k))


def _planted_unpermute(y_sorted, weights, order):  # the bug of exercise 3: weights in (token, slot) order
    N, k = weights.shape
    return torch.zeros(N, y_sorted.shape[1]).index_add(0, order // k, y_sorted * weights.reshape(-1, 1))


@triton.jit
def _tile(x_ptr, w_ptr, y_ptr, te_ptr, tr_ptr, off_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, MASK_ROWS: tl.constexpr, K_TAIL: tl.constexpr, WRITE: tl.constexpr,
          MASK_COLS: tl.constexpr, MASK_M: tl.constexpr = True):
    t, pid_n = tl.program_id(0), tl.program_id(1)
    g = tl.load(te_ptr + t)
    if g < 0:
        return
    rows = tl.load(tr_ptr + t) + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_end = tl.load(off_ptr + g)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_stop = K if K_TAIL else (K // BLOCK_K) * BLOCK_K  # without K_TAIL: the last partial K step is skipped
    for k0 in range(0, k_stop, BLOCK_K):
        kk = k0 + ks
        a = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(w_ptr + g * K * N + kk[:, None] * N + cols[None, :],
                    mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    keep = ((rows[:, None] < M) | (not MASK_M)) & ((cols[None, :] < N) | (not MASK_COLS))
    if MASK_ROWS:
        keep = keep & (rows[:, None] < row_end)
    if WRITE:
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=keep)


GOOD_TILE = dict(MASK_ROWS=True, K_TAIL=True, WRITE=True, MASK_COLS=True)


def test_exercise_checkers_accept_the_reference(capsys):
    check_dropped_fraction(_dropped)
    check_expected_groups(_groups)
    check_unpermute(unpermute)
    check_grouped_tile(with_constexprs(_tile, **GOOD_TILE))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("✓") for line in lines)


@pytest.mark.parametrize("checker, wrong", [
    (check_dropped_fraction, lambda shares, cf: sum(max(0.0, p - 1 / len(shares)) for p in shares)),  # no cf
    (check_dropped_fraction, lambda shares, cf: 2 * _dropped(shares, cf)),  # a fraction of tokens, not of N·k
    (check_expected_groups, lambda E, G, k: G * (1 - (1 - 1 / G) ** k)),  # with replacement
    (check_expected_groups, lambda E, G, k: min(k, G)),  # every expert in a new group
    (check_unpermute, _planted_unpermute),
    (check_unpermute, lambda ys, w, order: (ys[order].view(*w.shape, -1) * w[..., None]).sum(1)),  # wrong way
    (check_unpermute, lambda ys, w, order: unpermute(ys, torch.ones_like(w), order)),  # unweighted
    (check_grouped_tile, with_constexprs(_tile, **{**GOOD_TILE, "MASK_ROWS": False})),  # stores past the expert's end
    (check_grouped_tile, with_constexprs(_tile, **{**GOOD_TILE, "K_TAIL": False})),  # drops the last partial K step
    (check_grouped_tile, with_constexprs(_tile, **{**GOOD_TILE, "WRITE": False})),  # the stub: nothing stored
    (check_grouped_tile, with_constexprs(_tile, **{**GOOD_TILE, "MASK_COLS": False})),  # stores columns ≥ N
    # no row mask at all, columns masked: the last expert's tile stores rows past M (up to BLOCK_M - 1 of them)
    (check_grouped_tile, with_constexprs(_tile, **{**GOOD_TILE, "MASK_ROWS": False, "MASK_M": False})),
], ids=["dropped-no-cf", "dropped-per-token", "groups-with-replacement", "groups-min", "unpermute-planted-bug",
        "unpermute-wrong-direction", "unpermute-unweighted", "tile-no-row-mask", "tile-no-k-tail", "tile-stub",
        "tile-no-column-mask", "tile-no-row-mask-at-all"])
def test_exercise_checkers_reject_wrong_answers(checker, wrong):
    with pytest.raises(ExerciseError, match="✗"):
        checker(wrong)


@pytest.mark.parametrize("wrap", [np.float32, torch.tensor, lambda v: torch.tensor([v], dtype=torch.float64)],
                         ids=["np.float32", "0-d tensor", "one-element tensor"])
def test_numeric_checkers_take_a_right_number_in_any_form(capsys, wrap):
    check_dropped_fraction(lambda shares, cf: wrap(_dropped(shares, cf)))
    check_expected_groups(lambda E, G, k: wrap(_groups(E, G, k)))
    check_expected_groups(lambda E, G, k: G * (1 - Fraction(math.comb(E - E // G, k), math.comb(E, k))))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("✓") for line in lines)
    with pytest.raises(ExerciseError, match="you say"):  # a wrong number is still wrong
        check_expected_groups(lambda E, G, k: wrap(min(k, G)))
    with pytest.raises(ExerciseError, match="relative|expected"):
        check_dropped_fraction(lambda shares, cf: wrap(2 * _dropped(shares, cf)))


def test_numeric_checkers_ask_for_a_number():
    for answer in ("2.5", torch.ones(2), True):
        with pytest.raises(ExerciseError, match="must be a number"):
            check_expected_groups(lambda E, G, k: answer)  # noqa: B023
    with pytest.raises(ExerciseError, match="expected a number"):
        check_dropped_fraction(lambda shares, cf: torch.ones(2))


def test_exercise_checkers_report_a_stub_as_not_implemented():
    def stub(*args):
        raise NotImplementedError

    for checker in (check_dropped_fraction, check_expected_groups, check_unpermute):
        with pytest.raises(ExerciseError, match="not implemented yet"):
            checker(stub)


def test_package_exports_the_api():
    assert minisparse.moe.__all__[:1] and {"route_topk_softmax", "route_deepseek", "update_bias",
                                           "load_balancing_loss", "grouped_mm", "permute", "unpermute",
                                           "MoE"} <= set(minisparse.moe.__all__)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)], ids=["N=0", "T=0"])
@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_moe_layer_on_an_empty_batch(backend, shape):
    dev = DEV if backend == "triton" else "cpu"
    layer = MoE(16, 32, 8, 2, backend=backend).to(dev)
    x = torch.randn(shape, device=dev, requires_grad=True)
    y = layer(x)
    assert y.shape == shape
    if backend == "triton":  # the sorted path keeps the (empty) graph; the naive loop returns a constant
        y.sum().backward()
