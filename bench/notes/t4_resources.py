"""Which Triton kernels of minisparse can launch on a T4 (sm_75, 64 KiB of shared memory a block), compiled on a CPU.

    .venv/bin/python bench/notes/t4_resources.py              # every kernel, T4 (sm_75), 15-60 min on 2 cores
    .venv/bin/python bench/notes/t4_resources.py --only kda   # the LAUNCH_TABLE names that contain "kda"

For each kernel the package launches through `runtime.launch`, at the shapes of the chapters' benchmarks (bench/*.py;
the comment of each spec says which), this compiles every configuration of the LAUNCH_TABLE row a T4 reads
(`runtime.launch_configs` for an sm_75 device and fp16 inputs: its "sm_75" row, else the nearest newer one), after
the launcher's `fit`, with duplicates dropped as `runtime.launch` drops them. The pointers that carry the user's
16-bit tensors (and what the launcher allocates in the input dtype) are fp16 — a T4 has no bf16 — the fp32
intermediates fp32, index tensors int32/int64, and PRECISION is what the launcher passes for fp16 inputs. Shared
memory, registers and spills come from tools/kernel_resources.py (triton's metadata and `ptxas -v`).

"fits" means shared memory <= the limit (64 KiB on a T4): `runtime.launch` tries the row in order and keeps the first
configuration that fits, so a kernel can launch on a T4 if any configuration of its row fits, and raises
RuntimeError (or the op falls back to PyTorch) if none does.

Pointers are compiled 16-byte aligned, as the runtime marks torch's allocations (`--unaligned`: not; on sm_75 the two
need the same shared memory). Integers a launch sees as multiples of 16 get `tt.divisibility` on the GPU; `--div16
T,H,HV,K,V,NT` compiles the named ones so where a kernel has them (on sm_80 and newer this can turn on the loads'
pipelining and change shared memory and registers a lot; on sm_75 the KDA scans' shared memory is the same either
way). What this does not model: integers equal to 1 (constants on the GPU) and pointers the launcher passes as None
(they are compiled as typed pointers the kernel never reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Callable

os.environ["TRITON_INTERPRET"] = "0"  # compile for real: minisparse would otherwise pick the interpreter on a CPU
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import importlib  # noqa: E402
import inspect  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from kernel_resources import compile_for, kernel_resources  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from minisparse import runtime  # noqa: E402
from minisparse.deltanet.chunk_bwd import _k_and_v_tiles  # noqa: E402  (the launchers' own `fit` functions)
from minisparse.deltanet.chunk_fwd import _v_tile  # noqa: E402
from minisparse.dsa.triton import _fit_heads  # noqa: E402
from minisparse.lightning.triton import _state_tiles, _v_tiles  # noqa: E402
from minisparse.mla.triton import _split_tiles  # noqa: E402
from minisparse.nsa.triton import _fit_keys, _topn_heads  # noqa: E402


@dataclasses.dataclass
class Spec:
    """One launch of one LAUNCH_TABLE kernel, as its launcher makes it at a benchmark's shapes."""
    kernel: str  # LAUNCH_TABLE name
    fn: str  # module:function of the @triton.jit kernel
    constexprs: dict  # what the launcher passes beside the table's tiles
    fp16: str  # pointers that hold 16-bit tensors (space-separated); every other pointer is fp32 ...
    ints: dict = dataclasses.field(default_factory=dict)  # ... except these: pointer -> "i32" / "i64"
    floats: str = "scale"  # the float (not i32) runtime arguments
    fit: Callable | None = None  # the launcher's `fit`
    pointers: str | None = None  # the pointer arguments, where their names do not end in _ptr
    variant: str = ""  # which launch of the kernel, where the package launches it more than one way


def _grouped_mm_fit(c):  # moe.grouped_mm: every configuration takes the row's first BLOCK_M (the tile schedule's)
    return {**c, "BLOCK_M": t4_row("moe.grouped_mm")[0]["BLOCK_M"]}


def _dkv_fit(block_size, bg):  # nsa/moba .selection.dkv: keys capped at the block, at least one GQA group a step
    return lambda c: {**_fit_keys(block_size)(c), "BR": max(c["BR"], bg)}


def _indexer_fit(cq, bhi):  # dsa.indexer (the closure in dsa.triton._score_chunk)
    return lambda c: {**c, "BT": max(min(c["BT"], triton.next_power_of_2(cq)), triton.cdiv(16, bhi))}


# --------------------------------------------------------------------------------------------------- the kernels
# chapter 1, bench/attention.py: B = 2, H = 16, D = 128, causal (its sliding-window rows differ only in HAS_WINDOW)
_ATTN = dict(DK=128, DV=128, DK_PAD=128, DV_PAD=128, CAUSAL=True, HAS_WINDOW=False, PRECISION=None)
# chapter 3, bench/mla.py: DeepSeek-V3's latent 512 + rope 64 (BLOCK_N not shortened: the latent is not over 512)
_MLA = dict(DC=512, DR=64, BLOCK_DC=512, BLOCK_DR=64)
# chapter 7, bench/nsa.py: NSA HQ = 64, H = 4, D = 128, blocks of 64, 16 blocks a query (one selection a group: G = 16)
_NSA = dict(HQ=64, H=4, G=16, BS=64, D=128, DV=128, BD=128, BDV=128, PRECISION=None)
_GATED = dict(HQ=64, DV=128, BDV=128, CMP=True, SLC=True, SWA=True)
_DECODE = dict(HQ=64, H=4, G=16, D=128, DV=128, BG=16, BD=128, BDV=128, PRECISION=None)
# ... MoBA: HQ = H = 16, chunks of 128, top-16 (one selection a query head: HS = 16, G = 1)
_MOBA = dict(HQ=16, H=16, G=1, BS=128, D=128, DV=128, BD=128, BDV=128, PRECISION=None)
# ... and MoBA's own forward (gate, partial results, merge) at the same shapes
_MOBA_FWD = dict(HQ=16, H=16, K=16, CS=128, D=128, DV=128, BD=128, BDV=128, PRECISION=None)
# chapter 8, bench/dsa.py: MLA's absorbed form, 128 query heads over one key head of 512 + 64, v = k[..., :512]
_DSA_MLA = dict(HQ=128, H=1, G=128, D=576, DV=512, BDA=512, BDB=64, BDV=512, V_IS_KA=True, PRECISION=None)
# ... and the GQA form at D = 128 (bench/dsa.py does not time it; NSA's heads: HQ = 64, H = 4)
_DSA_GQA = dict(HQ=64, H=4, G=16, D=128, DV=128, BDA=128, BDB=0, BDV=128, V_IS_KA=False, PRECISION=None)

_SEL_FWD = dict(fp16="q_ptr k_ptr v_ptr o_ptr", ints={"idx_ptr": "i64"})
_SEL_DQ = dict(fp16="q_ptr k_ptr v_ptr do_ptr dq_ptr", ints={"idx_ptr": "i64"})
_SEL_DKV = dict(fp16="q_ptr k_ptr v_ptr do_ptr dk_ptr dv_ptr", ints={"offsets_ptr": "i32", "entries_ptr": "i32"})

SPECS = [
    # chapter 1: flash attention (minisparse/attention/triton.py, _forward / _backward)
    Spec("attention.fwd", "minisparse.attention.triton:_fwd_kernel", _ATTN, "Q K V O",
         pointers="Q K V O LSE", floats="qk_scale"),
    Spec("attention.delta", "minisparse.attention.triton:_bwd_delta_kernel", dict(DV=128, DV_PAD=128), "O DO",
         pointers="O DO DELTA", floats=""),
    Spec("attention.dkdv", "minisparse.attention.triton:_bwd_dkdv_kernel", _ATTN, "Q K V DO DK_OUT DV_OUT",
         pointers="Q K V DO LSE DELTA DK_OUT DV_OUT", floats="qk_scale sm_scale"),
    Spec("attention.dq", "minisparse.attention.triton:_bwd_dq_kernel", _ATTN, "Q K V DO DQ_OUT",
         pointers="Q K V DO LSE DELTA DQ_OUT", floats="qk_scale sm_scale"),
    # chapter 2, bench/moe.py: K = 2048, N = 2816 (and the layer's 2048 / 1408): both divide every BLOCK_K, BLOCK_N
    Spec("moe.grouped_mm", "minisparse.moe.triton:_grouped_mm_kernel",
         dict(EVEN_K=True, EVEN_N=True, PRECISION="tf32"), "x_ptr w_ptr y_ptr",
         ints={"offsets_ptr": "i32", "tile_expert_ptr": "i32", "tile_row_ptr": "i32"}, floats="",
         fit=_grouped_mm_fit),
    Spec("moe.grouped_mm_dw", "minisparse.moe.triton:_grouped_mm_dw_kernel", dict(PRECISION="tf32"),
         "x_ptr dy_ptr dw_ptr", ints={"offsets_ptr": "i32"}, floats=""),
    # chapter 3, bench/mla.py: one decoding step over the latent cache; partial states fp32
    Spec("mla.decode_split", "minisparse.mla.triton:_mla_decode_split_kernel", {**_MLA, "PRECISION": "tf32"},
         "ql_ptr qr_ptr kv_ptr kr_ptr", ints={"len_ptr": "i32"}, floats="qk_scale", fit=_split_tiles(512)),
    Spec("mla.decode_combine", "minisparse.mla.triton:_mla_decode_combine_kernel", dict(DC=512, BLOCK_DC=512),
         "o_ptr", ints={"len_ptr": "i32"}, floats=""),
    # chapter 4, bench/lightning.py: B = 2, H = 16, K = V = 128, no initial or final state; the chunk states are
    # stored in q's dtype (fp16), d initial/final state fp32
    Spec("lightning.fwd_states", "minisparse.lightning.triton:_fwd_states_kernel",
         dict(C=64, HAS_H0=False, STORE_HT=False, PRECISION="tf32"), "k_ptr v_ptr states_ptr", floats="",
         fit=_state_tiles(128, 128)),
    Spec("lightning.fwd_output", "minisparse.lightning.triton:_fwd_output_kernel",
         dict(C=64, PRECISION="tf32"), "q_ptr k_ptr v_ptr states_ptr o_ptr", fit=_state_tiles(128, 128)),
    Spec("lightning.bwd_dstates", "minisparse.lightning.triton:_bwd_dstates_kernel",
         dict(C=64, HAS_DHT=False, STORE_DH0=False, PRECISION="tf32"), "q_ptr do_ptr dstates_ptr",
         fit=_state_tiles(128, 128)),
    Spec("lightning.bwd_dqkv.k128", "minisparse.lightning.triton:_bwd_dqkv_kernel",
         dict(C=64, BK=128, PRECISION="tf32"),
         "q_ptr k_ptr v_ptr do_ptr states_ptr dstates_ptr dq_ptr dk_ptr dv_ptr", fit=_v_tiles(128, loop=True)),
    # ... its decoding kernel, from a state (h0 as given, fp32 here) to a final state
    Spec("lightning.fused_recurrent", "minisparse.lightning.triton:_fused_recurrent_kernel",
         dict(BK=128, HAS_H0=True, STORE_HT=True), "q_ptr k_ptr v_ptr o_ptr", fit=_v_tiles(128)),
    # chapter 5, bench/deltanet.py: B = 2, H = HV = 16, K = V = 128, use_qk_l2norm, no initial/final state. g, beta
    # fp32 (the op casts them); the forward stores W, U, the states in fp16, the backward recomputes them in fp32
    Spec("deltanet.fwd_wy", "minisparse.deltanet.chunk_fwd:_fwd_wy_kernel",
         dict(C=64, BK=32, SPLIT=False, L2=True, STORE_AINV=False, PRECISION="tf32"), "k_ptr v_ptr w_ptr u_ptr",
         floats="", fit=_v_tile(128), variant="forward"),
    Spec("deltanet.fwd_wy", "minisparse.deltanet.chunk_fwd:_fwd_wy_kernel",
         dict(C=64, BK=32, SPLIT=False, L2=False, STORE_AINV=True, PRECISION="tf32"), "k_ptr v_ptr",
         floats="", fit=_v_tile(128), variant="backward's recomputation"),
    Spec("deltanet.fwd_states", "minisparse.deltanet.chunk_fwd:_fwd_states_kernel",
         dict(C=64, BK=128, HAS_H0=False, STORE_HT=False, L2=True, PRECISION="tf32"),
         "k_ptr w_ptr u_ptr states_ptr", floats="", fit=_v_tile(128)),
    Spec("deltanet.fwd_states.recompute", "minisparse.deltanet.chunk_fwd:_fwd_states_kernel",
         dict(C=64, BK=128, HAS_H0=False, STORE_HT=False, L2=False, PRECISION="tf32"), "k_ptr", floats="",
         fit=_v_tile(128)),
    Spec("deltanet.fwd_output", "minisparse.deltanet.chunk_fwd:_fwd_output_kernel",
         dict(C=64, BK=64, L2=True, PRECISION="tf32"), "q_ptr k_ptr u_ptr states_ptr o_ptr", fit=_v_tile(128)),
    Spec("deltanet.bwd_du_local", "minisparse.deltanet.chunk_bwd:_bwd_du_local_kernel",
         dict(C=64, BK=128, PRECISION="tf32"), "q_ptr k_ptr do_ptr", fit=_v_tile(128)),
    Spec("deltanet.bwd_states", "minisparse.deltanet.chunk_bwd:_bwd_states_kernel",
         dict(C=64, BK=128, HAS_DHT=False, STORE_DH0=False, PRECISION="tf32"), "q_ptr k_ptr do_ptr",
         fit=_v_tile(128)),
    Spec("deltanet.bwd_wy", "minisparse.deltanet.chunk_bwd:_bwd_wy_kernel",
         dict(C=64, PRECISION="tf32"), "k_ptr v_ptr", fit=_k_and_v_tiles(128, 128)),
    Spec("deltanet.bwd_keys", "minisparse.deltanet.chunk_bwd:_bwd_keys_kernel",
         dict(C=64, PRECISION="tf32"), "q_ptr k_ptr do_ptr", fit=_k_and_v_tiles(128, 128)),
    Spec("deltanet.rows", "minisparse.deltanet.chunk_bwd:_l2norm_rows_kernel", dict(BK=128), "x_ptr y_ptr",
         floats="", variant="l2norm"),
    Spec("deltanet.rows", "minisparse.deltanet.chunk_bwd:_qk_grad_kernel", dict(BK=128, L2NORM=True),
         "x_ptr dx_ptr", floats="", variant="dq/dk"),
    # ... its decoding kernel, from a state to a final state
    Spec("deltanet.fused_recurrent", "minisparse.deltanet.fused_recurrent:_fused_recurrent_kernel",
         dict(BK=128, HAS_H0=True, STORE_HT=True, L2NORM=True), "q_ptr k_ptr v_ptr o_ptr", fit=_v_tile(128)),
    # chapter 6, bench/kda.py: H = HV = 16, K = V = 128, use_qk_l2norm (q, k normalised in fp16 first); the
    # forward's intermediates in the inputs' dtype except A, A_inv, P, the gate sums and gl (fp32)
    Spec("kda.fwd_between", "minisparse.kda.chunk_fwd:_kda_fwd_between_kernel",
         dict(C=64, BC=16, BK=32, PRECISION="tf32"), "q_ptr k_ptr", floats=""),
    Spec("kda.fwd_products", "minisparse.kda.chunk_fwd:_kda_fwd_products_kernel",
         dict(C=64, BC=16, BKD=128, PRECISION="tf32"), "q_ptr k_ptr", floats=""),
    Spec("kda.fwd_wy", "minisparse.kda.chunk_fwd:_kda_fwd_wy_kernel",
         dict(C=64, BC=16, BK=32, PRECISION="tf32"), "q_ptr k_ptr v_ptr w_ptr u_ptr qg_ptr kd_ptr", floats="",
         fit=_v_tile(128)),
    Spec("kda.fwd_states", "minisparse.kda.chunk_fwd:_kda_fwd_states_kernel",
         dict(C=64, BK=128, HAS_H0=False, STORE_HT=False, PRECISION="tf32"),
         "w_ptr u_ptr kd_ptr states_ptr", floats="", fit=_v_tile(128)),
    Spec("kda.fwd_output", "minisparse.kda.chunk_fwd:_kda_fwd_output_kernel",
         dict(C=64, BK=64, PRECISION="tf32"), "qg_ptr u_ptr states_ptr o_ptr", fit=_v_tile(128)),
    Spec("kda.bwd_du_local", "minisparse.kda.chunk_bwd:_kda_bwd_du_local_kernel",
         dict(C=64, PRECISION="tf32"), "do_ptr", fit=_v_tile(128)),
    Spec("kda.bwd_states", "minisparse.kda.chunk_bwd:_kda_bwd_states_kernel",
         dict(C=64, BK=128, HAS_DHT=False, STORE_DH0=False, PRECISION="tf32"),
         "do_ptr kd_ptr w_ptr qg_ptr dstates_ptr", fit=_v_tile(128)),
    Spec("kda.gate_sums", "minisparse.kda.chunk_fwd:_kda_gate_sums_kernel", dict(C=64, BC=16), "",
         floats=""),
    Spec("kda.bwd_chunk", "minisparse.kda.chunk_bwd:_kda_bwd_chunk_kernel",
         dict(C=64, BC=16, BK=32, PRECISION="tf32"),
         "q_ptr k_ptr v_ptr u_ptr states_ptr dstates_ptr do_ptr", fit=_v_tile(128)),
    Spec("kda.bwd_products", "minisparse.kda.chunk_bwd:_kda_bwd_products_kernel",
         dict(C=64, BC=16, BK=32, LEVELS=4, PRECISION="tf32"), "q_ptr k_ptr", floats=""),
    Spec("kda.suffix_sums", "minisparse.kda.chunk_bwd:_chunk_suffix_sums_kernel", dict(C=64, BK=32), "",
         floats=""),
    Spec("kda.fused_recurrent", "minisparse.kda.fused_recurrent:_kda_fused_recurrent_kernel",
         dict(BK=128, HAS_H0=True, STORE_HT=True, L2NORM=True), "q_ptr k_ptr v_ptr o_ptr", fit=_v_tile(128)),
    # chapter 7, bench/nsa.py (see _NSA, _MOBA); the top-n at T = 64K: N = 1024 summaries
    Spec("nsa.selection.fwd", "minisparse.nsa.triton:selection_fwd_kernel", {**_NSA, "HS": 4, "S": 16, "BG": 16},
         **_SEL_FWD, fit=_fit_keys(64)),
    Spec("nsa.selection.fwd", "minisparse.nsa.triton:selection_fwd_kernel",
         {**_NSA, "HS": 4, "S": 16, "BG": 16, "GATED": True, "CMP": True, "SWA": True},
         fp16="q_ptr k_ptr v_ptr o_ptr oc_ptr ow_ptr gc_ptr gs_ptr gw_ptr", ints={"idx_ptr": "i64"},
         fit=_fit_keys(64), variant="gated sum in the epilogue (no autograd)"),
    Spec("nsa.mean_pool", "minisparse.nsa.triton:mean_pool_kernel", dict(H=4, D=128, BS=64, BD=128), "x_ptr o_ptr",
         floats=""),
    Spec("nsa.selection.dq", "minisparse.nsa.triton:selection_dq_kernel", {**_NSA, "HS": 4, "S": 16, "BG": 16},
         **_SEL_DQ, fit=_fit_keys(64)),
    Spec("nsa.selection.dkv", "minisparse.nsa.triton:selection_dkv_kernel", {**_NSA, "R": 1, "BG": 16},
         **_SEL_DKV, fit=_dkv_fit(64, 16)),
    Spec("nsa.select", "minisparse.nsa.triton:select_topk_kernel",
         dict(HQ=64, H=4, G=16, S=16, SP=16, BS=64, D=128, DV=128, BG=16, BD=128, BDV=128, BNA=1024,
              CMP_OUT=False, PRECISION=None), "q_ptr kc_ptr vc_ptr ocmp_ptr", ints={"idx_ptr": "i64"},
         variant="top-n"),
    Spec("nsa.select", "minisparse.nsa.triton:select_topk_kernel",
         dict(HQ=64, H=4, G=16, S=16, SP=16, BS=64, D=128, DV=128, BG=16, BD=128, BDV=128, BNA=1024,
              CMP_OUT=True, PRECISION=None), "q_ptr kc_ptr vc_ptr ocmp_ptr", ints={"idx_ptr": "i64"},
         variant="top-n + compressed output"),
    # ... the decoding step at 64K (N = 1024 summaries, 16 pieces of them, the three branches)
    Spec("nsa.decode.scores", "minisparse.nsa.triton:decode_scores_kernel", {**_DECODE, "BS": 64, "CMP": True, "STORE_S": True},
         "q_ptr kc_ptr vc_ptr", floats="qk_scale"),
    Spec("nsa.decode.select", "minisparse.nsa.triton:decode_select_kernel",
         {**_DECODE, "S": 16, "SP": 16, "BS": 64, "BNC": 16, "BNA": 1024, "PICK": True, "SLC": True, "SWA": True},
         "q_ptr k_ptr v_ptr", ints={"idx_ptr": "i64"}, floats="qk_scale",
         fit=lambda c: _fit_keys(64)(_topn_heads(c, _DECODE["BG"], 1024))),
    Spec("nsa.decode.merge", "minisparse.nsa.triton:decode_merge_kernel",
         {k: _DECODE[k] for k in ("HQ", "H", "G", "DV")} | dict(CMP=True, SLC=True, SWA=True),
         "gc_ptr gs_ptr gw_ptr o_ptr", floats=""),
    # ... the three branches' gated sum, forward and backward (the compressed branch strided, as SDPA returns it)
    Spec("nsa.gated_sum", "minisparse.nsa.triton:gated_sum_fwd_kernel", _GATED, "oc_ptr os_ptr ow_ptr gc_ptr gs_ptr "
         "gw_ptr o_ptr", floats="", variant="forward"),
    Spec("nsa.gated_sum", "minisparse.nsa.triton:gated_sum_bwd_kernel", _GATED, "do_ptr oc_ptr os_ptr ow_ptr gc_ptr "
         "gs_ptr gw_ptr doc_ptr dos_ptr dow_ptr dgc_ptr dgs_ptr dgw_ptr", floats="", variant="backward"),
    Spec("moba.gate", "minisparse.nsa.triton:moba_gate_kernel",
         dict(HQ=16, H=16, K=16, KP=16, CS=128, D=128, BD=128, PRECISION=None), "q_ptr kb_ptr",
         ints={"idx_ptr": "i64"}, floats=""),
    Spec("moba.partial", "minisparse.nsa.triton:moba_partial_kernel", {**_MOBA_FWD},
         "q_ptr k_ptr v_ptr op_ptr", ints={p: "i64" for p in ("seg_ptr", "tiles_ptr", "offsets_ptr",
                                                                "entries_ptr")},
         fit=lambda c: {**c, **{n: t4_row("moba.partial")[0][n] for n in ("BR", "NT")}}),
    Spec("moba.merge", "minisparse.nsa.triton:moba_merge_kernel", {**_MOBA_FWD}, "q_ptr k_ptr v_ptr op_ptr o_ptr"),
    Spec("moba.selection.dq", "minisparse.nsa.triton:selection_dq_kernel",
         {**_MOBA, "HS": 16, "S": 16, "BG": 16}, **_SEL_DQ, fit=_fit_keys(128)),
    Spec("moba.selection.dkv", "minisparse.nsa.triton:selection_dkv_kernel", {**_MOBA, "R": 1, "BG": 1},
         **_SEL_DKV, fit=_dkv_fit(128, 1)),
    # chapter 8, bench/dsa.py (see _DSA_MLA): prefill, and decoding 16 sequences, run unsplit on a T4's 40 SMs;
    # decoding one sequence splits its 2,048 slots (SPLIT, then the merge kernel)
    Spec("dsa.sparse.fwd.d512", "minisparse.dsa.triton:sparse_fwd_kernel", {**_DSA_MLA, "SPLIT": False},
         "q_ptr k_ptr v_ptr o_ptr", ints={"idx_ptr": "i64"}, floats="qk_scale", fit=_fit_heads(128),
         variant="unsplit"),
    Spec("dsa.sparse.fwd.d512", "minisparse.dsa.triton:sparse_fwd_kernel", {**_DSA_MLA, "SPLIT": True},
         "q_ptr k_ptr v_ptr o_ptr", ints={"idx_ptr": "i64"}, floats="qk_scale", fit=_fit_heads(128),
         variant="SPLIT (decoding B = 1)"),
    Spec("dsa.sparse.merge", "minisparse.dsa.triton:sparse_merge_kernel", dict(DV=512, BDV=512), "o_ptr",
         floats=""),
    Spec("dsa.sparse.bwd.d512", "minisparse.dsa.triton:sparse_bwd_kernel", _DSA_MLA,
         "q_ptr k_ptr v_ptr do_ptr dq_ptr", ints={"idx_ptr": "i64"}, floats="scale qk_scale",
         fit=_fit_heads(128)),
    Spec("dsa.sparse.fwd", "minisparse.dsa.triton:sparse_fwd_kernel", {**_DSA_GQA, "SPLIT": False},
         "q_ptr k_ptr v_ptr o_ptr", ints={"idx_ptr": "i64"}, floats="qk_scale", fit=_fit_heads(16)),
    Spec("dsa.sparse.bwd", "minisparse.dsa.triton:sparse_bwd_kernel", _DSA_GQA,
         "q_ptr k_ptr v_ptr do_ptr dq_ptr", ints={"idx_ptr": "i64"}, floats="scale qk_scale",
         fit=_fit_heads(16)),
    # ... the lightning indexer: 64 heads x 128 dims, a prefill chunk of 4,096 queries
    Spec("dsa.indexer", "minisparse.dsa.triton:indexer_score_kernel",
         dict(HI=64, DI=128, BHI=64, BDI=128, PRECISION=None), "q_ptr k_ptr w_ptr", fit=_indexer_fit(4096, 64)),
]

# Rows no benchmark reaches at its shapes: attention's head dims over 128 (D = 256 here), lightning's K <= 64.
EXTRA_SPECS = [
    Spec("attention.fwd.d256", "minisparse.attention.triton:_fwd_kernel",
         {**_ATTN, "DK": 256, "DV": 256, "DK_PAD": 256, "DV_PAD": 256}, "Q K V O", pointers="Q K V O LSE",
         floats="qk_scale", variant="D = 256"),
    Spec("attention.dkdv.d256", "minisparse.attention.triton:_bwd_dkdv_kernel",
         {**_ATTN, "DK": 256, "DV": 256, "DK_PAD": 256, "DV_PAD": 256}, "Q K V DO DK_OUT DV_OUT",
         pointers="Q K V DO LSE DELTA DK_OUT DV_OUT", floats="qk_scale sm_scale", variant="D = 256"),
    Spec("attention.dq.d256", "minisparse.attention.triton:_bwd_dq_kernel",
         {**_ATTN, "DK": 256, "DV": 256, "DK_PAD": 256, "DV_PAD": 256}, "Q K V DO DQ_OUT",
         pointers="Q K V DO LSE DELTA DQ_OUT", floats="qk_scale sm_scale", variant="D = 256"),
    Spec("lightning.bwd_dqkv", "minisparse.lightning.triton:_bwd_dqkv_kernel", dict(C=64, BK=64, PRECISION="tf32"),
         "q_ptr k_ptr v_ptr do_ptr states_ptr dstates_ptr dq_ptr dk_ptr dv_ptr", fit=_v_tiles(64, loop=True),
         variant="K = V = 64"),
]


# ------------------------------------------------------------------------------------------------ the machinery
DEVICE = "t4"  # a stand-in device: runtime.arch reads its answer from this cache before asking torch.cuda
runtime._arch_of[DEVICE] = "sm_75"  # main() sets the row of --arch


def t4_row(kernel: str) -> list[dict]:
    """The configurations `runtime.launch` would try for `kernel` on that device with fp16 inputs."""
    return runtime.launch_configs(kernel, DEVICE, torch.float16)


def row_name(kernel: str) -> str:
    """Which LAUNCH_TABLE row that is: the GPU's own, else the next older, else the nearest newer (runtime._row)."""
    order, own = runtime._ARCH_ORDER, runtime._arch_of[DEVICE]
    i = order.index(own)
    name = next(n for n in (*order[i:], *order[:i][::-1]) if n in runtime.LAUNCH_TABLE[kernel])
    assert runtime.LAUNCH_TABLE[kernel][name] is runtime._row(kernel, DEVICE, torch.float16)
    return name


def fitted_configs(spec: Spec) -> list[dict]:
    """The row after the launcher's `fit`, duplicates dropped (as runtime.launch does)."""
    out = []
    for c in t4_row(spec.kernel):
        c = spec.fit(dict(c)) if spec.fit else c
        if c not in out:
            out.append(c)
    return out


def jit_function(path: str) -> JITFunction:
    module, name = path.split(":")
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # @triton.heuristics wraps the grouped GEMM
        fn = fn.fn
    return fn


def measure(spec: Spec, config: dict, arch: int, aligned: bool, div16: set = frozenset()) -> dict:
    fn = jit_function(spec.fn)
    tiles = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages", "launch_pdl")}
    constexprs = {**spec.constexprs, **tiles}
    if "GDC" in inspect.signature(fn.fn).parameters:  # grid dependency control: Hopper and newer, as the launchers
        constexprs.setdefault("GDC", arch >= 90)
    dtypes = {**{p: "fp16" for p in spec.fp16.split()}, **spec.ints}
    floats = set(spec.floats.split())
    pointers = set(spec.pointers.split()) if spec.pointers else None
    warps, stages = config["num_warps"], config["num_stages"]
    params = inspect.signature(fn.fn).parameters
    ints = {n for n in div16 if n in params and n not in constexprs and n not in floats
            and not (n in pointers if pointers else n.endswith("_ptr"))}  # the kernel's integers of those named
    kernel = compile_for(fn, constexprs, dtypes, floats, warps, stages, arch, pointers, aligned, div16=ints)
    return kernel_resources(kernel, arch)


def describe(config: dict) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.items() if k not in ("num_warps", "num_stages"))
    return f"w{config['num_warps']} s{config['num_stages']} {tiles}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=75, help="compute capability to compile for (default 75: a T4)")
    ap.add_argument("--shared-kib", type=float, default=64, help="shared memory a block may use (T4: 64 KiB)")
    ap.add_argument("--only", default="", help="only the LAUNCH_TABLE names that contain this")
    ap.add_argument("--extra", action="store_true", help="also the rows no benchmark shape reaches (D = 256, K = 64)")
    ap.add_argument("--unaligned", action="store_true", help="pointers of unknown alignment (the GPU sees 16 bytes)")
    ap.add_argument("--div16", default="", help="comma-separated integer argument names (e.g. T,H,HV,K,V,NT) to "
                    "compile as multiples of 16 where a kernel has them, as a launch at the benchmark's shapes does")
    args = ap.parse_args()
    div16 = set(filter(None, args.div16.split(",")))
    row = "sm_90" if args.arch >= 90 else "sm_80" if args.arch >= 80 else "sm_75"
    runtime._arch_of[DEVICE] = row
    specs = [s for s in SPECS + (EXTRA_SPECS if args.extra else []) if args.only in s.kernel]
    print(f"triton {triton.__version__}, sm_{args.arch} (LAUNCH_TABLE row {row}, fp16 inputs), "
          f"limit {args.shared_kib:g} KiB a block{', pointers of unknown alignment' if args.unaligned else ''}"
          f"{f', integers {args.div16} multiples of 16' if div16 else ''}\n")
    print("| kernel | row | config | shared KiB | registers | spills (B stored / loaded) | fits |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []  # (kernel label, any fits, smallest shared KiB)
    for spec in specs:
        label = spec.kernel + (f" ({spec.variant})" if spec.variant else "")
        table_row = row_name(spec.kernel)
        shared = []
        for config in fitted_configs(spec):
            t0 = time.time()
            try:
                r = measure(spec, config, args.arch, not args.unaligned, div16)
            except Exception as err:  # noqa: BLE001 - report it, go on with the next configuration
                first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:150]
                print(f"| {label} | {table_row} | {describe(config)} | compile failed: {type(err).__name__}: "
                      f"{first} | | | no |", flush=True)
                continue
            fits = r["shared_kib"] <= args.shared_kib
            shared.append(r["shared_kib"])
            print(f"| {label} | {table_row} | {describe(config)} | {r['shared_kib']:.1f} | {r['registers']} | "
                  f"{r['spill_stores']} / {r['spill_loads']} | {'yes' if fits else 'NO'} |", flush=True)
            print(f"    ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        verdicts.append((label, any(s <= args.shared_kib for s in shared), min(shared, default=None)))
    print(f"\n| kernel | any configuration fits in {args.shared_kib:g} KiB | least shared KiB of its row |")
    print("|---|---|---|")
    for label, ok, least in verdicts:
        print(f"| {label} | {'yes' if ok else 'NO'} | {'-' if least is None else f'{least:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
