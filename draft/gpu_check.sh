#!/usr/bin/env bash
# Chapter 8's kernels on a GPU, one call: the draft tests on CUDA (bf16 and fp16), then bench/dsa.py (--long: 128K too).
#   bash draft/gpu_check.sh OUTDIR          from the repository root; logs and dsa.json land in OUTDIR
# Budget: tests ≈ 1–2 min (compilation), bench ≈ 3–4 min on an H200; AUTOTUNE=1 adds a tuning run at 32K.
set -u
out=${1:?usage: draft/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
{ nvidia-smi -L; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$out/env.log" 2>&1
# the tests: one thread a worker (compilation is CPU-bound); xdist when installed
workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n $workers")
OMP_NUM_THREADS=1 timeout "${TEST_TIMEOUT:-400}" $py -m pytest draft/test_dsa_triton.py -q -rs $xdist \
  -p no:cacheprovider > "$out/tests_dsa.log" 2>&1
echo "tests rc=$?" >> "$out/tests_dsa.log"
tail -n 15 "$out/tests_dsa.log"
# the benchmark on a quiet GPU (--smoke first: a broken script fails in seconds, not after the dense baseline)
TRITON_INTERPRET=1 timeout 120 $py bench/dsa.py --out "$out/smoke" --smoke > "$out/bench_dsa_smoke.log" 2>&1 || \
  echo "bench smoke failed: see $out/bench_dsa_smoke.log"
timeout "${BENCH_TIMEOUT:-420}" $py bench/dsa.py --out "$out" --long > "$out/bench_dsa.log" 2>&1
echo "bench rc=$?" | tee -a "$out/bench_dsa.log"
tail -n 40 "$out/bench_dsa.log"
# optional (AUTOTUNE=1, ≈ 2–3 min more): each kernel's launch-table row timed at 32K, the winners printed last
if [ "${AUTOTUNE:-0}" = 1 ]; then
  timeout 300 $py bench/dsa.py --out "$out/autotune" --T 32768 --autotune > "$out/bench_dsa_autotune.log" 2>&1
  echo "autotune rc=$?"; grep -E "^autotuned|x " "$out/bench_dsa_autotune.log"
fi
