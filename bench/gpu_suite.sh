#!/usr/bin/env bash
# One call on a GPU machine: the test suite on CUDA, the chapters as plain scripts, then the benchmarks.
#   bash bench/gpu_suite.sh OUTDIR [bench names...]      e.g. bash bench/gpu_suite.sh $OUT attention moe
# Wheels in .whl/ are installed first (into /tmp/site). Environment: TESTS (default tests), CHAPTERS (default
# every chapter), TEST_TIMEOUT, CHAPTER_TIMEOUT, BENCH_TIMEOUT (seconds), BENCH_ARGS (passed to every bench
# script, e.g. "--long").
# Logs and <name>.json land in OUTDIR; copy the JSON into bench/results/ and commit it.
set -u
out=${1:?usage: gpu_suite.sh OUTDIR [bench ...]}; shift
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# wheels brought along to a machine without a package index (.whl/*.whl, e.g. fla-core for the fla comparisons)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))
# the tests first, one thread per worker (compilation is CPU-bound; oversubscribed threads slow everything)
OMP_NUM_THREADS=1 timeout "${TEST_TIMEOUT:-300}" python3 -m pytest ${TESTS:-tests} -q -rs -n "$workers" -p no:cacheprovider \
  > "$out/tests.log" 2>&1; echo "tests rc=$?" >> "$out/tests.log"
# then the chapters as plain scripts, side by side, then the benchmarks on a quiet GPU
for c in ${CHAPTERS:-chapters/0[1-9]_*.py}; do
  ( OMP_NUM_THREADS=4 timeout "${CHAPTER_TIMEOUT:-200}" python3 "$c" > "$out/$(basename "$c" .py).log" 2>&1
    echo "rc=$?" >> "$out/$(basename "$c" .py).log" ) &
done
wait
tail -n 4 "$out/tests.log"
for c in ${CHAPTERS:-chapters/0[1-9]_*.py}; do echo "$c: $(tail -n 1 "$out/$(basename "$c" .py).log")"; done
for b in "$@"; do
  echo "== bench/$b.py"
  timeout "${BENCH_TIMEOUT:-200}" python3 "bench/$b.py" --out "$out" ${BENCH_ARGS:-} > "$out/bench_$b.log" 2>&1; echo "bench $b rc=$?"
  tail -n 25 "$out/bench_$b.log"
done
