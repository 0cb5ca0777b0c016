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
# (its failure, e.g. without Opacus, does not change the exit status; the
# bundle's pinned Opacus wheel in wheels/ is first installed into pydeps/
# without network). Then the federated acceptance: the fedsvd crate's device
# test (fedsvd-tests/device, at most 120 s), a random model of the MiniLM
# shape with the bundle's tokenizer (bin/fedsvd bench random-model, 60 s),
# the same seeded quick run (3 rounds, dropout 0, evaluation every round, on
# the bundle's Rotten Tomatoes data in assets/) on cuda (runs/gpu, 120 s) and
# on the CPU (runs/cpu, 150 s), and compare_runs.py on the two (losses within
# 1e-3, ε identical, accuracy within one example); then the same pair and
# comparison for FedAvg-LoRA, which trains A as well as B (runs/gpu-fedavg,
# 120 s, and runs/cpu-fedavg, 150 s). Each part's wall time goes
# to results.txt. Output also goes to results.txt beside this script, or to
# $OUT/results.txt when OUT is set (runs/ and model-random/ then go under
# $OUT too).
#
# Local dry run of the federated tail only, on a machine without a GPU:
#   FEDSVD_BUNDLE_DEVICE=cpu FEDSVD_BUNDLE_ONLY=federated gpu-bundle/run.sh
# runs the "GPU" run on the CPU and skips everything before it; it proves the
# paths and commands, not the device.
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
only="${FEDSVD_BUNDLE_ONLY:-}"
device="${FEDSVD_BUNDLE_DEVICE:-cuda}"
[ "$device" = cuda ] || export FEDSVD_REQUIRE_GPU=0
if [ "$only" != federated ]; then
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
    # shape batch seq steps precision privacy (dp, nondp, or dp-ab: DP with
    # A trained too, as FedAvg-LoRA/FLoRA/FedEx-LoRA; the peers train B only)
    while read -r shape batch seq steps prec priv; do
        if [ $((SECONDS - start)) -gt 150 ]; then
            echo "==> skipped (time): $shape $batch x $seq $prec $priv" | tee -a "$results"
            continue
        fi
        extra=""
        [ "$priv" = nondp ] && extra="--non-private"
        [ "$priv" = dp-ab ] && extra="--train-a"
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
minilm 32 64 10 f32 dp-ab
minilm 256 128 5 f32 dp-ab
RUNS
fi
if [ -f bench/opacus_gpu_step.py ]; then
    echo "==> peer: bench/opacus_gpu_step.py (timeout 120 s)" | tee -a "$results"
    # Opacus is not in the machine's image: the bundle's pinned wheel goes
    # into pydeps (no network, no dependencies: PyTorch is there).
    for w in wheels/opacus-*.whl; do
        [ -f "$w" ] || continue
        echo "==> pip install --no-index --no-deps --target pydeps $w" | tee -a "$results"
        python3 -m pip install --no-index --no-deps --target pydeps "$w" 2>&1 | tail -n 3 | tee -a "$results"
    done
    if [ -d pydeps ]; then export PYTHONPATH="$here/pydeps:${PYTHONPATH:-}"; fi
    timeout 120 python3 bench/opacus_gpu_step.py 2>&1 | tee -a "$results"
    echo "peer exit status ${PIPESTATUS[0]}" | tee -a "$results"
fi
fi # FEDSVD_BUNDLE_ONLY
work="${OUT:-$here}"
if [ -x fedsvd-tests/device ] && [ "$only" != federated ]; then
    echo "==> fedsvd-tests/device (timeout 120 s)" | tee -a "$results"
    t0=$SECONDS
    timeout 120 fedsvd-tests/device --test-threads=1 2>&1 | tee -a "$results"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    echo "time fedsvd-tests/device: $((SECONDS - t0)) s" | tee -a "$results"
fi
tok=assets/models/all-MiniLM-L6-v2/tokenizer.json
if [ -x bin/fedsvd ] && [ -f "$tok" ] && [ -d assets/data/rt ]; then
    export FEDSVD_ASSETS="$here/assets"
    model="$work/model-random"
    rm -rf "$model" "$work/runs/gpu" "$work/runs/cpu" "$work/runs/gpu-fedavg" "$work/runs/cpu-fedavg"
    mkdir -p "$work/runs"
    echo "==> fedsvd bench random-model --shape minilm (timeout 60 s)" | tee -a "$results"
    t0=$SECONDS
    timeout 60 bin/fedsvd bench random-model --shape minilm --tokenizer "$tok" --out "$model" \
        </dev/null 2>&1 | tee -a "$results"
    rc=${PIPESTATUS[0]}
    echo "time random-model: $((SECONDS - t0)) s (exit $rc)" | tee -a "$results"
    if [ "$rc" -ne 0 ]; then
        status=1
    else
        # The preset's FedSVD (B only), then FedAvg-LoRA (A and B); the two
        # runs of a method differ only in --device and --out.
        for method in fedsvd fedavg; do
            suffix=""
            fed=(run --preset quick --set "model.dir=$model" --set federation.rounds=3
                --set federation.seed=1 --set adapters.dropout=0 --set federation.eval_every=1)
            if [ "$method" != fedsvd ]; then
                suffix="-$method"
                fed+=(--method "$method")
            fi
            ok=1
            for side in gpu cpu; do
                dev=cpu lim=150
                [ "$side" = gpu ] && dev="$device" lim=120
                echo "==> fedsvd run --method $method --device $dev --out runs/$side$suffix (timeout $lim s)" | tee -a "$results"
                t0=$SECONDS
                timeout "$lim" bin/fedsvd "${fed[@]}" --device "$dev" --out "$work/runs/$side$suffix" \
                    </dev/null 2>&1 | tee -a "$results"
                rc=${PIPESTATUS[0]}
                echo "time run $side$suffix ($dev, $method): $((SECONDS - t0)) s (exit $rc)" | tee -a "$results"
                [ "$rc" -eq 0 ] || { status=1; ok=0; }
            done
            if [ "$ok" -eq 1 ]; then
                echo "==> compare_runs.py runs/gpu$suffix runs/cpu$suffix ($method)" | tee -a "$results"
                timeout 30 python3 compare_runs.py "$work/runs/gpu$suffix" "$work/runs/cpu$suffix" 2>&1 | tee -a "$results"
                [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            fi
        done
    fi
else
    echo "==> federated acceptance skipped: bin/fedsvd, $tok or assets/data/rt missing" | tee -a "$results"
    status=1
fi
echo "== exit status $status" | tee -a "$results"
exit "$status"
