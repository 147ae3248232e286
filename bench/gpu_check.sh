#!/usr/bin/env bash
# The GPU check: every stage of the experiment for a few steps on a 0.94B model at the GPU count
# of this machine, a mix on GPU, a checkpoint save and resume, and measured MFU and peak memory
# beside `nemo-btx plan`'s predictions. Run it from the repository root, in the project's venv,
# on any machine with CUDA GPUs (an even count, or 1) and Transformer Engine:
#
#   bench/gpu_check.sh [OUT_DIR]              # default runs/gpu_check; ~10-20 min on 8 H100
#   bench/gpu_check.sh --dry-run [OUT_DIR]    # no GPU: print the commands, validate them, and
#                                             # write the plan's predictions (GPUS=8 by default)
#
# Writes OUT_DIR/{plan.txt,run.log,resume-*.log,gpu_check.json} and prints the comparison.
# It has not run on a GPU yet (no GPU is lent where it was written): see the README.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=$(realpath -m "${1:-runs/gpu_check}")
PY=${PYTHON:-python}
mkdir -p "$OUT"

if [ "$DRY" = 1 ]; then
  GPUS=${GPUS:-8}
else
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$GPUS" -ge 1 ] || { echo "gpu_check: no CUDA GPU on this machine (use --dry-run)" >&2; exit 2; }
fi
if [ "$GPUS" -eq 1 ]; then
  DENSE=single; MOE=single
elif [ $((GPUS % 2)) -eq 0 ]; then
  DENSE=gpu_check_dense; MOE=gpu_check_moe
else
  echo "gpu_check: $GPUS GPUs; use 1 or an even number (CUDA_VISIBLE_DEVICES)" >&2; exit 2
fi

# A 0.94B Llama-style model (under the 1B from which the toy corpora are refused), 32k-token
# steps, a few steps per stage; every stage at a layout over all the machine's GPUs.
OVERRIDES=(
  "run.dir=$OUT/run"
  model.name=gpu_check_0.94b model.num_layers=16 model.hidden_size=2048 model.ffn_hidden_size=5504 model.num_attention_heads=16
  model.vocab_size=32000 model.seq_length=2048
  train.micro_batch_size=1 train.global_batch_size=16 train.warmup_iters=2 train.lr=3e-4
  data.max_chars_per_domain=8000000
  seed.train_iters=30 seed.save_interval=10 seed.eval_interval=30
  expert.train_iters=10 expert.save_interval=10 expert.eval_interval=10
  finetune.train_iters=10 finetune.save_interval=10 finetune.eval_interval=10
  "baselines.which=[upcycle-data,dense]" baselines.save_interval=100 baselines.eval_interval=100
  eval.limit=2 eval.max_gen_toks=32 eval.batch_size=4
  "cluster.gpus_per_node=$GPUS"
  "run.layouts.seed=$DENSE" "run.layouts.experts=$DENSE" "run.layouts.dense=$DENSE"
  "run.layouts.mix=$MOE" "run.layouts.finetune=$MOE" "run.layouts.upcycle=$MOE" "run.layouts.baselines=$MOE"
)
# Save and resume: a plain training job from the seed, uninterrupted (a) and stopped at step 10
# through the stop file, then resumed (b); their losses must be equal.
RESUME=(train "job.init=$OUT/run/seed/weights" train.train_iters=20 job.save_interval=5 job.eval_interval=100
        "parallel=$DENSE")
LAUNCH=("$PY" -m torch.distributed.run --standalone "--nproc-per-node=$GPUS" -m nemo_btx.cli)

say() { echo "gpu_check: $*"; }
say "$GPUS GPU(s), layouts $DENSE / $MOE, output in $OUT"
"$PY" -m nemo_btx.cli plan "${OVERRIDES[@]}" | tee "$OUT/plan.txt"

if [ "$DRY" = 1 ]; then
  "$PY" -m nemo_btx.cli validate "${OVERRIDES[@]}" "parallel=$DENSE" "parallel.world_size=$GPUS"
  "$PY" -m nemo_btx.cli validate "${OVERRIDES[@]}" "parallel=$MOE" model.moe.num_experts=4 "parallel.world_size=$GPUS"
  say "would run: $PY -m nemo_btx.cli run ${OVERRIDES[*]}"
  for tag in a b; do say "would run: ${LAUNCH[*]} ${RESUME[*]} ${OVERRIDES[*]} job.out=$OUT/resume-$tag"; done
  "$PY" bench/gpu_check_report.py --predict-only "$OUT" "${OVERRIDES[@]}"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
"$PY" -m nemo_btx.cli run "${OVERRIDES[@]}" 2>&1 | tee "$OUT/run.log"

"${LAUNCH[@]}" "${RESUME[@]}" "${OVERRIDES[@]}" "job.out=$OUT/resume-a" > "$OUT/resume-a.log" 2>&1
export NEMO_BTX_STOP_FILE=$OUT/resume-b.stop
rm -f "$NEMO_BTX_STOP_FILE"
"${LAUNCH[@]}" "${RESUME[@]}" "${OVERRIDES[@]}" "job.out=$OUT/resume-b" > "$OUT/resume-b.log" 2>&1 &
child=$!
until [ -f "$OUT/resume-b/metrics.jsonl" ] && [ "$(wc -l < "$OUT/resume-b/metrics.jsonl")" -ge 10 ]; do
  kill -0 "$child" 2>/dev/null || break
  sleep 1
done
touch "$NEMO_BTX_STOP_FILE"
rc=0; wait "$child" || rc=$?
say "stopped run exited $rc (75: saved and asked to be requeued)"
rm -f "$NEMO_BTX_STOP_FILE"
"${LAUNCH[@]}" "${RESUME[@]}" "${OVERRIDES[@]}" "job.out=$OUT/resume-b" >> "$OUT/resume-b.log" 2>&1
unset NEMO_BTX_STOP_FILE

"$PY" bench/gpu_check_report.py "$OUT" "${OVERRIDES[@]}"
