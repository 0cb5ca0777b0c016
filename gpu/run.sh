#!/usr/bin/env bash
# Runs the fedsvd-kernels GPU bundle (built by `cargo xtask gpu-bundle`) on a
# machine with CUDA and no Rust toolchain: every test binary with
# FEDSVD_REQUIRE_GPU=1 (so a missing device fails instead of skipping), then
# the benchmark (arguments of this script go to it, e.g. --quick), then the
# fedsvd-model GPU parity tests (model-tests/gpu, at most 90 s) and
# `fedsvd bench step --device cuda` at MiniLM 32x64, MiniLM 256x128 and
# RoBERTa-large 64x128 (each at most 25 s; DP and --non-private at f32, DP at
# tf32 and bf16; no new run starts once 150 s of this part have passed; the
# JSON lines also go to bench-step.jsonl beside results.txt), then, when
# the bundle carries it, the peer's PyTorch/Opacus step for at most 120 s
# (its failure, e.g. without Opacus, does not change the exit status). Output
# also goes to results.txt beside this script, or to $OUT/results.txt when OUT
# is set.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
export FEDSVD_REQUIRE_GPU=1
# cuBLAS usually lives with the toolkit; the driver library is on the default path.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    if [ -d "$d" ]; then export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; fi
done
results="${OUT:-$here}/results.txt"
: > "$results"
status=0
{
    echo "== $(date -u +%FT%TZ) $(cat MANIFEST 2>/dev/null | sed -n 2p)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
} | tee -a "$results"
for t in tests/*; do
    echo "==> $t" | tee -a "$results"
    # The source-tree check reads kernels/ from the build machine's checkout.
    "$t" --test-threads=1 --skip every_cu_file_is_listed_and_current 2>&1 | tee -a "$results"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo "==> benchmark" | tee -a "$results"
./bin/fedsvd-kernels-bench "$@" 2>&1 | tee -a "$results"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ -x model-tests/gpu ]; then
    echo "==> model-tests/gpu (timeout 90 s)" | tee -a "$results"
    timeout 90 model-tests/gpu --test-threads=1 2>&1 | tee -a "$results"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ -x bin/fedsvd ]; then
    jsonl="${OUT:-$here}/bench-step.jsonl"
    : > "$jsonl"
    start=$SECONDS
    # shape batch seq steps precision privacy
    while read -r shape batch seq steps prec priv; do
        if [ $((SECONDS - start)) -gt 150 ]; then
            echo "==> skipped (time): $shape $batch x $seq $prec $priv" | tee -a "$results"
            continue
        fi
        extra=""
        [ "$priv" = nondp ] && extra="--non-private"
        echo "==> fedsvd bench step --device cuda --shape $shape --batch $batch --seq $seq --steps $steps --precision $prec $extra (timeout 25 s)" | tee -a "$results"
        timeout 25 bin/fedsvd bench step --device cuda --shape "$shape" --batch "$batch" \
            --seq "$seq" --steps "$steps" --precision "$prec" $extra --json </dev/null 2>&1 \
            | tee -a "$results" | grep '^{' >> "$jsonl"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done <<'RUNS'
minilm 32 64 10 f32 dp
minilm 32 64 10 f32 nondp
minilm 256 128 5 f32 dp
minilm 256 128 5 f32 nondp
roberta-large 64 128 3 f32 dp
roberta-large 64 128 3 f32 nondp
minilm 256 128 5 tf32 dp
roberta-large 64 128 3 tf32 dp
roberta-large 64 128 3 bf16 dp
RUNS
fi
if [ -f bench/opacus_gpu_step.py ]; then
    echo "==> peer: bench/opacus_gpu_step.py (timeout 120 s)" | tee -a "$results"
    # Opacus is not in the machine's image: a `pip install --target pydeps`
    # of its wheel placed beside this script is picked up.
    if [ -d pydeps ]; then export PYTHONPATH="$here/pydeps:${PYTHONPATH:-}"; fi
    timeout 120 python3 bench/opacus_gpu_step.py 2>&1 | tee -a "$results"
    echo "peer exit status ${PIPESTATUS[0]}" | tee -a "$results"
fi
echo "== exit status $status" | tee -a "$results"
exit "$status"
