"""Chapter 0's exercise checkers (minisparse.overview): each accepts a correct answer with one line and rejects
known-wrong answers (the mistakes a reader makes) with ExerciseError."""
import numpy as np
import pytest

from minisparse.overview import check_cache_prediction, check_moba_cost, check_param_counts
from minisparse.testing import ExerciseError

try:  # exercises 1 and 2 read transformers' configuration classes
    import transformers
except ImportError:
    transformers = None
HF = pytest.mark.skipif(transformers is None, reason="the checkers read transformers' model configurations")


def _stub(*args):
    raise NotImplementedError


def _passes(checker, answer, capsys):
    checker(answer)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("✓"), out


# ------------------------------------------------------------------------------ exercise 1: parameter counts
def _params(c, *, heads_out=None, untied_head=True, active_experts=None, shared=True, dense_layers=None,
            router=True, input_active=False):
    """(total, active) of a DeepSeek-V3-style config; the keyword arguments plant the usual mistakes."""
    H, heads = c.hidden_size, c.num_attention_heads
    q_out = heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    q = H * q_out if c.q_lora_rank is None else H * c.q_lora_rank + c.q_lora_rank * q_out
    kv = H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    attention = q + kv + heads * c.v_head_dim * H
    expert = 3 * H * c.moe_intermediate_size
    dense = c.first_k_dense_replace if dense_layers is None else dense_layers
    n_moe = c.num_hidden_layers - dense
    heads_emb = 2 if (untied_head and not c.tie_word_embeddings) else 1
    everyone = (c.vocab_size * H * heads_emb + c.num_hidden_layers * attention + dense * 3 * H * c.intermediate_size
                + n_moe * ((c.n_routed_experts * H if router else 0) + (c.n_shared_experts * expert if shared else 0)))
    k = c.num_experts_per_tok if active_experts is None else active_experts(c)
    input_table = 0 if (c.tie_word_embeddings or input_active) else c.vocab_size * H
    return everyone + n_moe * c.n_routed_experts * expert, everyone - input_table + n_moe * k * expert


@HF
def test_param_counts_accepts_the_solution_and_rejects_the_usual_mistakes(capsys):
    _passes(check_param_counts, _params, capsys)
    wrongs = [
        lambda c: _params(c, untied_head=False),  # the output head forgotten (it is not tied in DeepSeek-V3)
        lambda c: _params(c, active_experts=lambda c: c.n_routed_experts),  # every expert counted as active
        lambda c: _params(c, shared=False),  # the shared experts forgotten
        lambda c: _params(c, dense_layers=0),  # every layer taken for an MoE layer
        lambda c: _params(c, router=False),  # the routers forgotten: 0.28 % of DeepSeek-V3's active count
        lambda c: tuple(reversed(_params(c))),  # (active, total)
        lambda c: _params(c, input_active=True),  # the input embedding counted as active (the table, not a row)
    ]
    for wrong in wrongs:
        with pytest.raises(ExerciseError, match="case"):
            check_param_counts(wrong)
    with pytest.raises(ExerciseError, match="not implemented"):
        check_param_counts(_stub)


@HF
def test_param_counts_reproduce_deepseek_v3s_published_numbers():
    total, active = _params(transformers.DeepseekV3Config())
    assert round(total / 1e9) == 671 and round(active / 1e9, 1) == 36.6  # README_WEIGHTS.md: 671B, 36.6B


# ------------------------------------------------------------------------------ exercise 2: cache prediction
@HF
def test_cache_prediction_accepts_a_prediction_within_ten_percent(capsys):
    _passes(check_cache_prediction, lambda: ("Kimi Linear", 7 * 576 / (12 * 2 * 2 * 256)), capsys)
    _passes(check_cache_prediction, lambda: ("kimi", 0.31), capsys)
    _passes(check_cache_prediction, lambda: ("kimi", np.float32(0.31)), capsys)  # any number


@HF
@pytest.mark.parametrize("answer, match", [
    (("Qwen3-Next", 3.0), "does not keep the smaller"),  # the wrong model, ratio inverted
    (("Kimi Linear", 7 / 12), "not within"),  # counted the full layers, not their width
    (("Kimi Linear", 576 / 1024), "not within"),  # counted the width, not the full layers
    (("Kimi Linear", 27 / 48), "not within"),  # counted all the layers
    (("Kimi Linear or Qwen3-Next", 0.33), "name one model"),
    (("Kimi Linear", "0.33"), "not within"),
    (("Kimi Linear", float("nan")), "not within"),  # a placeholder or 0/0
    ("Kimi Linear", "return \\(name, ratio\\)"),
])
def test_cache_prediction_rejects_wrong_predictions(answer, match):
    with pytest.raises(ExerciseError, match=match):
        check_cache_prediction(lambda: answer)


@HF
def test_cache_prediction_reports_a_stub():
    with pytest.raises(ExerciseError, match="not implemented"):
        check_cache_prediction(_stub)


# ------------------------------------------------------------------------------------- exercise 3: MoBA cost
def _moba(T, block, top_k, *, own_extra=1, k_earlier=lambda k: k - 1, gate=0.5, gate_extra=0):
    t = np.arange(T)
    earlier = t // block
    keys = t % block + own_extra + np.minimum(k_earlier(top_k), earlier) * block
    return float(keys.sum() + gate * (earlier + gate_extra).sum())


def test_moba_cost_accepts_the_solution_and_rejects_the_usual_mistakes(capsys):
    _passes(check_moba_cost, _moba, capsys)
    wrongs = [
        lambda T, b, k: _moba(T, b, k, own_extra=0),  # the query's own key left out (t mod block, no + 1)
        lambda T, b, k: _moba(T, b, k, k_earlier=lambda k: k),  # top_k earlier blocks besides its own
        lambda T, b, k: _moba(T, b, k, gate=0.0),  # the gate forgotten
        lambda T, b, k: _moba(T, b, k, gate_extra=1),  # the gate also scores the query's own block
        lambda T, b, k: _moba(T, b, k, gate=1.0),  # a gate score counted as a whole pair
        lambda T, b, k: float(int(_moba(T, b, k))),  # the half pairs of the gate floored away
    ]
    for wrong in wrongs:
        with pytest.raises(ExerciseError, match="case"):
            check_moba_cost(wrong)
    with pytest.raises(ExerciseError, match="not implemented"):
        check_moba_cost(_stub)


def test_moba_cost_limits():
    """top_k covering every block reads what full attention reads (plus the gate); top_k = 1 reads one block."""
    T, block = 1000, 64
    n_blocks = -(-T // block)
    gate = 0.5 * (np.arange(T) // block).sum()
    assert _moba(T, block, n_blocks) == T * (T + 1) / 2 + gate
    assert _moba(T, block, 1) == (np.arange(T) % block + 1).sum() + gate
