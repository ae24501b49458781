#!/usr/bin/env bash
# Everything that needs a CUDA device, in one command, for a GPU lent for a few minutes:
#   1. python -m benchmarks.gpu_check (equivalence per backend, fragile lengths, compile, timings);
#   2. the tests that want a CUDA device;
#   3. the benchmarks on CUDA, stock and ours in one session: fp32 eager, fp32 compiled, fp16 eager.
# Usage: benchmarks/gpu_all.sh OUT_DIR   (after `make setup`, from the repository root; PYTHON=... to pick
# the interpreter, by default .venv/bin/python where it exists, else python3).
# Writes OUT_DIR/all.log and one JSON file per step; each step has a time limit (seconds) and a
# failed or timed-out step does not stop the next. Exit status 1 if any step failed. The limits
# add up to 590 s, under the 600 s a lent device runs one command (the decoding cases take at
# least 15 rounds: about 12 s for each beam search case on an H200).
# A CPU dry run of the same steps at small sizes: DEVICE=cpu QUICK=1 benchmarks/gpu_all.sh OUT_DIR
# (LIMIT_SCALE=N, a whole number, multiplies every limit: the limits are sized for the GPU, and on 2 busy CPU cores
# the dry run's fp32 benchmarks took 118 s of their 130 s and the fp16 ones passed their 60 s).
set -u -o pipefail
out=${1:?usage: benchmarks/gpu_all.sh OUT_DIR}
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
device=${DEVICE:-cuda}
quick=${QUICK:+--quick}
scale=${LIMIT_SCALE:-1}
case $scale in
    ''|*[!0-9]*|0*) echo "LIMIT_SCALE must be a whole number from 1, got '$scale'" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME LIMIT COMMAND...
    local name=$1 limit=$(($2 * scale)) start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$out/all.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$out/all.log"
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$out/all.log"
    [ "$rc" -eq 0 ] || status=1
}

bench() {  # bench NAME LIMIT DTYPE -k EXPRESSION
    step "$1" "$2" "$py" -m pytest -q -p no:cacheprovider benchmarks $quick --bench-device "$device" \
        --bench-dtype "$3" --benchmark-enable --benchmark-json="$out/$1.json" "${@:4}"
}

step env 30 "$py" -c "import torch, espnet, espnet_mha.optional as o; print(o.versions());
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
step gpu_check 200 "$py" -m benchmarks.gpu_check --device "$device" $quick --out "$out/gpu_check.json"
step cuda_tests 60 "$py" -m pytest -q -p no:cacheprovider -m gpu tests
bench bench_fp32 130 float32 -k "not compiled and not stock_layout"
bench bench_fp32_compiled 110 float32 -k "compiled"
bench bench_fp16 60 float16 -k "test_bench_layer and not compiled and not stock_layout"
exit $status
