#!/bin/bash
# Submit the nemo-btx job chain of runs/llama2_7b (rendered by `nemo-btx launch`).
# A job starts when its parents completed (afterok); when one fails, the jobs after it
# are cancelled (--kill-on-invalid-dep=yes). Fix the cause and run `nemo-btx launch` with
# the same overrides again: it submits only what is incomplete.
# Run it from the directory the jobs should run in (the repository).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "runs/llama2_7b/slurm/logs"
submit() { sbatch --parsable "$@" | cut -d ';' -f 1; }
tokenizer=$(submit "$HERE/01-tokenizer.sbatch")
echo "tokenizer $tokenizer"
data=$(submit --dependency=afterok:$tokenizer "$HERE/02-data.sbatch")
echo "data $data"
seed=$(submit --dependency=afterok:$data "$HERE/03-seed.sbatch")
echo "seed $seed"
branch=$(submit --dependency=afterok:$seed "$HERE/04-branch.sbatch")
echo "branch $branch"
experts=$(submit --dependency=afterok:$branch "$HERE/05-experts.sbatch")
echo "experts $experts"
mix=$(submit --dependency=afterok:$experts "$HERE/06-mix.sbatch")
echo "mix $mix"
finetune=$(submit --dependency=afterok:$mix "$HERE/07-finetune.sbatch")
echo "finetune $finetune"
upcycle=$(submit --dependency=afterok:$seed "$HERE/08-upcycle.sbatch")
echo "upcycle $upcycle"
baselines=$(submit --dependency=afterok:$finetune:$upcycle "$HERE/09-baselines.sbatch")
echo "baselines $baselines"
dense=$(submit --dependency=afterok:$finetune "$HERE/10-dense.sbatch")
echo "dense $dense"
eval_seed=$(submit --dependency=afterok:$seed "$HERE/11-eval-seed.sbatch")
echo "eval-seed $eval_seed"
eval_experts=$(submit --dependency=afterok:$experts "$HERE/12-eval-experts.sbatch")
echo "eval-experts $eval_experts"
eval_finetune=$(submit --dependency=afterok:$finetune "$HERE/13-eval-finetune.sbatch")
echo "eval-finetune $eval_finetune"
eval_baselines=$(submit --dependency=afterok:$baselines "$HERE/14-eval-baselines.sbatch")
echo "eval-baselines $eval_baselines"
eval_dense=$(submit --dependency=afterok:$dense "$HERE/15-eval-dense.sbatch")
echo "eval-dense $eval_dense"
report=$(submit --dependency=afterany:$eval_seed:$eval_experts:$eval_finetune:$eval_baselines:$eval_dense "$HERE/16-report.sbatch")
echo "report $report"
