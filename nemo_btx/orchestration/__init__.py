"""Orchestration: the experiment as a graph of units (`units`), run on this machine stage after
stage (`local`: `nemo-btx run`) or as a Slurm job chain (`slurm` renders, `launch` submits).

Stages never import this package; it starts them as processes with the command a cluster job
runs, so they talk only through the run directory (nemo_btx/run_dir.py)."""
