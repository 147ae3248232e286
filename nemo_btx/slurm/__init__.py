"""Slurm: the experiment as a chain of sbatch jobs (`render`). What a training stage does when
the job's time limit nears lives in `nemo_btx.runtime.preemption` (the loop uses it on any
launcher). Nothing here imports torch: scripts are rendered on a login node."""
