"""The experiment as a chain of Slurm jobs: sbatch scripts rendered from `units.plan`.

One job per stage of the plan, in its order; the stages with one unit per domain or model
(experts, baselines, eval) are array jobs, one task per unit. Every task runs exactly the
command `nemo-btx run` runs for its unit (`units.command`), so stages still talk only
through files, skip what is complete and resume from their last checkpoint.
Nothing here imports torch: scripts are rendered on a login node.

How a job starts its processes (documented in each script):
- GPU cluster (cluster.gpus_per_node > 0): `srun` starts one task per node and each runs
  `torchrun --nnodes $SLURM_NNODES --nproc-per-node <GPUs used per node>` with a c10d
  rendezvous on the job's first node; the job's world size is its layout's
  (parallel.world_size, else cluster.nodes x gpus_per_node) and must fit the layout's grid.
- CPU cluster (gpus_per_node = 0): the layout's process count (the ep2 layout: 2), no GPU
  request. With cluster.nodes = 1, one node: `torchrun --standalone` when it is above one, plain
  `python` otherwise. With cluster.nodes = N > 1, a job of several processes spreads them evenly
  over N nodes (its count must be a multiple of N) and starts them as on a GPU cluster: srun,
  one torchrun per node, the c10d rendezvous on the first node, gloo between the hosts.

Dependencies: `--dependency=afterok` on the nearest parent jobs that were submitted (the graph
of the units' needs, `job_parents`), with `--kill-on-invalid-dep=yes`, so a failed job cancels
everything downstream of it. The evaluations are one array job per stage whose models they
score (`eval-seed`, `eval-experts` with BTM, `eval-finetune`, ...), each waiting only for that
stage: the seed and the experts are evaluated while BTX and the baselines still train.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nemo_btx.config.schema import ExperimentConfig, ParallelConfig
from nemo_btx.config.validate import check_cluster
from nemo_btx.errors import ConfigError
from nemo_btx.orchestration.units import (
    STAGES, Unit, command, layout_config, nproc_of, pending, plan, select, with_missing_needs)
from nemo_btx.run_dir import RunDir

#: Stages with one array task per unit.
ARRAY_STAGES = ("tokenize", "data", "experts", "baselines", "eval")
#: Stages that need no GPU (on a GPU cluster they go to cluster.cpu_partition).
CPU_STAGES = ("tokenizer", "tokenize", "data", "branch", "report")
#: CPU stages whose process uses many cores (worker processes): cluster.data_cpus each.
DATA_STAGES = ("tokenizer", "tokenize", "data")
SUBMIT_SCRIPT = "submit.sh"



@dataclass
class Job:
    """One sbatch job: a stage's units and the resources its layout needs."""

    index: int
    stage: str
    units: List[Unit]
    layout: Optional[str]
    parallel: Optional[ParallelConfig]
    """The layout the stage trains at (None: one process, no model parallelism)."""
    nodes: int
    procs_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    partition: Optional[str]
    time: str
    todo: List[int] = field(default_factory=list)
    """Indices of the units that are not complete (what a launch submits)."""
    key: str = ""
    """The job's name in the chain: its stage, or `eval-<stage>` for the evaluations of the
    models one stage makes."""

    def __post_init__(self):
        self.key = self.key or self.stage

    @property
    def var(self) -> str:
        """submit.sh's shell variable holding the job id."""
        return self.key.replace("-", "_")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def is_array(self) -> bool:
        return self.stage in ARRAY_STAGES

    @property
    def script(self) -> str:
        return f"{self.index:02d}-{self.key}.sbatch"

    def array_spec(self, indices: Optional[Sequence[int]] = None) -> str:
        """`0-2`, `1`, `0,2-3`: Slurm's --array syntax for these task indices."""
        idx = sorted(range(len(self.units)) if indices is None else indices)
        parts, start = [], None
        for i, v in enumerate(idx):
            if start is None:
                start = v
            if i + 1 == len(idx) or idx[i + 1] != v + 1:
                parts.append(str(start) if start == v else f"{start}-{v}")
                start = None
        return ",".join(parts)

    def layout_text(self) -> str:
        """`tp 2 x pp 1 x cp 1 x dp 4 = 8 processes (1 node x 8 GPUs)` for the script header."""
        where = (f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node} GPU"
                 f"{'s' if self.gpus_per_node > 1 else ''}" if self.gpus_per_node
                 else f"{self.nodes} node{'s' if self.nodes > 1 else ''}, no GPU")
        if self.parallel is None:
            return f"{self.world_size} process{'es' if self.world_size > 1 else ''} ({where})"
        p = self.parallel
        dp = self.world_size // (p.tp * p.pp * p.cp)
        ep = f", ep {p.ep} x etp {p.tp if p.etp is None else p.etp}" if p.ep > 1 else ""
        return (f"tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {dp} = {self.world_size} processes "
                f"({where}){ep}")


# ------------------------------------------------------------------------------ jobs

def _parallel_of(cfg: ExperimentConfig, layout: Optional[str], overrides: Sequence[str],
                 config_name: str) -> ParallelConfig:
    return cfg.parallel if layout is None else layout_config(layout, overrides, config_name)


def resources(cfg: ExperimentConfig, stage: str, layout: Optional[str], overrides: Sequence[str],
               config_name: str) -> dict:
    """nodes, processes and GPUs per node, and the layout of one stage's job."""
    from nemo_btx.config.validate import min_world_size

    c = cfg.cluster
    g = c.gpus_per_node
    if g == 0:
        # Exactly the processes `nemo-btx run` starts, on one node or spread over cluster.nodes.
        n = nproc_of(layout, overrides, config_name)
        p = _parallel_of(cfg, layout, overrides, config_name) if n > 1 else None
        nodes = c.nodes if n > 1 else 1
        if n % nodes:
            raise ConfigError("cluster.nodes", c.nodes, f"{stage} runs {n} processes at layout "
                              f"{layout or 'parallel'}, which do not spread evenly over {nodes} nodes")
        return dict(nodes=nodes, procs_per_node=n // nodes, gpus_per_node=0, parallel=p)
    if stage in CPU_STAGES:
        return dict(nodes=1, procs_per_node=1, gpus_per_node=0, parallel=None)
    if stage == "eval" and layout is None:
        # Without a layout, evaluation is one process at TP=PP=EP=1 on one GPU; a layout gives
        # each model replica its tp/pp/ep and the rest data-parallel (nemo_btx/evaluation).
        return dict(nodes=1, procs_per_node=1, gpus_per_node=1, parallel=None)
    p = _parallel_of(cfg, layout, overrides, config_name)
    if p.world_size is not None:  # the layout fixes the world: whole nodes of it
        world = p.world_size
        key, value = (f"run.layouts.{stage}", layout) if layout else ("parallel.world_size", world)
        if world > g and world % g:
            raise ConfigError(key, value, f"its world size {world} is not a whole number of nodes "
                              f"of cluster.gpus_per_node={g} GPUs")
        nodes, per_node = (1, world) if world <= g else (world // g, g)
    else:
        key, value = "cluster.nodes", c.nodes
        nodes, per_node = c.nodes, g
        world = nodes * g
    need = min_world_size(p)
    if world % need:
        raise ConfigError(key, value, f"{stage} runs at layout {layout or 'parallel'} (tp {p.tp} x pp "
                          f"{p.pp} x cp {p.cp}, ep {p.ep}), which needs a multiple of {need} "
                          f"processes; {nodes} node(s) x {per_node} GPUs = {world}")
    return dict(nodes=nodes, procs_per_node=per_node, gpus_per_node=per_node, parallel=p)


def build_jobs(cfg: ExperimentConfig, overrides: Sequence[str] = (), config_name: str = "config") -> List[Job]:
    """The jobs of the experiment, in pipeline order, with the units still to do marked."""
    check_cluster(cfg)  # also in validate(); build_jobs is called on its own by tests and tools
    c = cfg.cluster
    units = plan(cfg)
    by_stage: Dict[str, List[Unit]] = {}
    for unit in units:
        by_stage.setdefault(unit.stage, []).append(unit)
    todo = {id(u) for u in pending(units)}
    jobs: List[Job] = []
    for stage, key, group in _job_groups(units, by_stage):
        layout = group[0].layout
        assert all(u.layout == layout for u in group), f"{stage}: units at different layouts"
        res = resources(cfg, stage, layout, overrides, config_name)
        for unit in group:
            unit.nproc = res["procs_per_node"] * res["nodes"]
        gpu = res["gpus_per_node"] > 0
        jobs.append(Job(
            index=len(jobs) + 1, stage=stage, units=group, layout=layout,
            cpus_per_task=data_cpus(cfg) if stage in DATA_STAGES else c.cpus_per_process * res["procs_per_node"],
            partition=c.partition if gpu or c.gpus_per_node == 0 else (c.cpu_partition or c.partition),
            time=time_of(cfg, stage),
            todo=[i for i, u in enumerate(group) if id(u) in todo], key=key,
            **res))
    # New results anywhere: the report is rebuilt (as `nemo-btx run` does).
    if any(j.todo for j in jobs[:-1]) and jobs[-1].stage == "report":
        jobs[-1].todo = list(range(len(jobs[-1].units)))
    if c.only is not None:  # a part of the chain: the chosen units and their missing needs
        chosen = {id(u) for u in with_missing_needs(units, select(units, None, ",".join(c.only), flag="cluster.only"))}
        for job in jobs:
            job.todo = [i for i in job.todo if id(job.units[i]) in chosen]
    return jobs


def _job_groups(units: List[Unit], by_stage: Dict[str, List[Unit]]):
    """(stage, job key, units) of each job in chain order: one job per stage, except the
    evaluations, grouped by the stage that makes the models they score."""
    stage_of = {u.name: u.stage for u in units}
    for stage in STAGES:
        group = by_stage.get(stage)
        if not group:
            continue
        if stage != "eval":
            yield stage, stage, group
            continue
        producers: Dict[str, List[Unit]] = {}
        for unit in group:
            made_by = max((stage_of[n] for n in unit.needs), key=STAGES.index, default="seed")
            producers.setdefault(made_by, []).append(unit)
        for made_by in sorted(producers, key=STAGES.index):
            yield stage, f"eval-{made_by}", producers[made_by]


def data_cpus(cfg: ExperimentConfig) -> int:
    """CPUs of a data job (its workers tokenize with one core each)."""
    c = cfg.cluster
    return c.data_cpus or c.cpus_per_process * max(1, c.gpus_per_node)


def time_of(cfg: ExperimentConfig, stage: str) -> str:
    c = cfg.cluster
    if stage == "eval":
        return c.eval_time or c.time
    if stage in CPU_STAGES:
        return c.cpu_time or c.time
    return c.time


def job_parents(jobs: List[Job]) -> Dict[str, Tuple[str, ...]]:
    """The job-level graph of the units' needs (what each job waits for), in chain order,
    without a parent that another parent already depends on."""
    job_of = {u.name: j.key for j in jobs for u in j.units}
    direct = {j.key: {job_of[n] for u in j.units for n in u.needs if job_of[n] != j.key} for j in jobs}

    def ancestors(key: str) -> set:
        out = set()
        for p in direct[key]:
            out |= {p} | ancestors(p)
        return out

    order = [j.key for j in jobs]
    reduced = {}
    for key, parents in direct.items():
        implied = set().union(*(ancestors(p) for p in parents)) if parents else set()
        reduced[key] = tuple(k for k in order if k in parents and k not in implied)
    return reduced


def dependencies(jobs: List[Job], submitted: Sequence[str]) -> Dict[str, List[str]]:
    """For each submitted job (by key), the nearest submitted jobs upstream of it."""
    parents = job_parents(jobs)
    chosen = set(submitted)
    memo: Dict[str, List[str]] = {}

    def nearest(key: str) -> List[str]:
        if key not in memo:
            out: List[str] = []
            for parent in parents.get(key, ()):
                for k in ([parent] if parent in chosen else nearest(parent)):
                    if k not in out:
                        out.append(k)
            memo[key] = out
        return memo[key]

    order = [j.key for j in jobs]
    return {j.key: [k for k in order if k in nearest(j.key)] for j in jobs if j.key in chosen}


# ------------------------------------------------------------------------------ scripts

@dataclass
class Target:
    """Where the scripts run: `workdir` None renders paths relative to the submit directory
    (the checked-in examples); otherwise jobs `--chdir` there and logs use absolute paths."""

    workdir: Optional[str]
    python: str
    config_name: str = "config"
    overrides: Sequence[str] = ()

    @classmethod
    def for_launch(cls, cfg: ExperimentConfig, overrides: Sequence[str], config_name: str) -> "Target":
        c = cfg.cluster
        python = c.python or ("python" if c.container_image else sys.executable)
        return cls(os.path.abspath(c.workdir or os.getcwd()), python, config_name,
                   stage_overrides(overrides))

    def run_dir(self, cfg: ExperimentConfig) -> str:
        rd = cfg.run.dir
        return rd if self.workdir is None or os.path.isabs(rd) else os.path.join(self.workdir, rd)


def stage_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides the stage commands get: all but cluster.* (they only shape the jobs)."""
    return [o for o in overrides if not o.lstrip("+~").startswith("cluster.")]


def _q(text) -> str:
    return shlex.quote(str(text))


def _dq(text: str) -> str:
    """Inside double quotes, keeping $VARIABLES (e.g. $SLURM_SUBMIT_DIR) live."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'


_RUNNER = r'''
# Stop cleanly before the time limit: sbatch sends USR1 (--signal) to this script, which
# creates the stop file; a training stage then saves a checkpoint and exits, and the job
# requeues itself and resumes from that checkpoint. Every start/end goes to events.jsonl.
STOP_FILE=$STOP_DIR/$SLURM_JOB_ID
export NEMO_BTX_STOP_FILE=$STOP_FILE
mkdir -p "$STOP_DIR"
rm -f "$STOP_FILE"
event() {
  printf '{"unit": "%s", "job": "%s", "array_job": "%s", "task": "%s", "event": "%s", "rc": %s, "time": %s, "restart": %s, "host": "%s"}\n' \
    "$UNIT" "$SLURM_JOB_ID" "${SLURM_ARRAY_JOB_ID:-}" "${SLURM_ARRAY_TASK_ID:-}" "$1" "${2:-null}" \
    "$(date +%s.%N)" "${SLURM_RESTART_COUNT:-0}" "$(hostname -s)" >> "$EVENTS"
}
stopping=0
on_usr1() { stopping=1; echo "nemo-btx: time limit near: $UNIT saves a checkpoint and stops"; touch "$STOP_FILE"; }
on_term() { stopping=1; echo "nemo-btx: preempted (TERM): $UNIT saves a checkpoint and stops"; touch "$STOP_FILE"; }
trap on_usr1 USR1
trap on_term TERM

event start
echo "nemo-btx: $UNIT (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: ${LAUNCH[*]} ${CLI[*]}"
"${LAUNCH[@]}" "${CLI[@]}" &
child=$!
while :; do
  rc=0
  wait "$child" || rc=$?
  kill -0 "$child" 2>/dev/null || break  # still running: the wait was cut short by a signal
done
if [ "$rc" -ne 0 ] && { [ "$stopping" = 1 ] || [ "$rc" -eq 75 ]; }; then
  event requeue "$rc"
  echo "nemo-btx: $UNIT stopped early (exit $rc): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
event end "$rc"
exit "$rc"
'''


def render_script(job: Job, cfg: ExperimentConfig, target: Target, has_parents: bool) -> str:
    c = cfg.cluster
    rd = RunDir(target.run_dir(cfg))
    logs = rd.slurm_logs
    lines = ["#!/bin/bash"]
    what = {"tokenize": "one array task per unit of a domain's input", "data": "one array task per domain",
            "experts": "one array task per domain", "baselines": "one array task per MoE baseline",
            "dense": "the dense baseline, at its own layout",
            "eval": "one array task per model"}.get(job.stage)
    lines.append(f"# nemo-btx: stage `{job.stage}` of the experiment in {cfg.run.dir}"
                 f"{f' ({what})' if what else ''}.")
    lines.append("# Rendered by `nemo-btx launch` from the experiment config; the stage command is the")
    lines.append("# one `nemo-btx run` runs, so a resubmitted job skips what is complete and resumes.")
    if job.is_array:
        lines.append("# Tasks: " + " ".join(f"{i}={u.item}" for i, u in enumerate(job.units)))
        lines.append("# Re-run failed tasks alone: sbatch --array=1 THIS_SCRIPT (complete tasks skip anyway).")
    lines.append(f"# Layout {job.layout or 'parallel (the experiment default)'}: {job.layout_text()}")
    sb = [f"--job-name={c.job_prefix}-{job.key}"]
    if job.is_array:
        spec = job.array_spec()
        sb.append(f"--array={spec}{f'%{c.array_parallelism}' if c.array_parallelism else ''}")
    sb += [f"--nodes={job.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={job.cpus_per_task}"]
    if job.gpus_per_node:
        sb.append(f"--gpus-per-node={job.gpus_per_node}")
        if c.exclusive and job.procs_per_node == c.gpus_per_node:
            sb.append("--exclusive")
    if c.mem is not None:
        sb.append(f"--mem={c.mem}")
    sb.append(f"--time={job.time}")
    for key, value in (("partition", job.partition), ("account", c.account), ("qos", c.qos)):
        if value:
            sb.append(f"--{key}={value}")
    if target.workdir is not None:
        sb.append(f"--chdir={target.workdir}")
    sb.append(f"--output={logs}/%x-{'%A_%a' if job.is_array else '%j'}.out")
    sb.append("--open-mode=append")
    sb.append("--requeue" if c.requeue else "--no-requeue")
    if c.signal_seconds:
        sb.append(f"--signal=B:USR1@{c.signal_seconds}")
    if has_parents:
        sb.append("--kill-on-invalid-dep=yes")
    sb += list(c.sbatch_args)
    lines += [f"#SBATCH {opt}" for opt in sb]
    lines += ["set -euo pipefail", "", f"RUN_DIR={_dq(rd.root)}", f"STOP_DIR={_dq(rd.slurm_stop)}",
              f"EVENTS={_dq(rd.slurm_events)}", f"PYTHON={_dq(target.python)}",
              f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{c.cpus_per_process}}}",
              "export PYTHONUNBUFFERED=1"]
    for item in c.env:
        name, _, value = str(item).partition("=")
        lines.append(f"export {name}={_q(value)}")
    if c.setup:
        lines += ["# cluster.setup", *c.setup]

    # The stage command: pipeline.command() of each unit, the per-unit part in a case.
    lines += ["", "# The stage command: what `nemo-btx run` runs for this unit.",
              f"OVERRIDES=({' '.join(_q(o) for o in target.overrides)})"]
    tail = [f"parallel={job.layout}"] if job.layout else []
    for unit in job.units:
        # The script's CLI below, spelled out: it must be pipeline.command()'s.
        assert _cli_of(unit, target) == ["-m", "nemo_btx.cli", "--config-name", target.config_name,
                                         *unit.args, *target.overrides, *tail], unit.name
    if job.is_array:
        lines.append('case "${SLURM_ARRAY_TASK_ID:?an array job: submit it with --array}" in')
        for i, unit in enumerate(job.units):
            lines.append(f"  {i}) UNIT={_q(unit.name)}; ARGS=({' '.join(_q(a) for a in unit.args)}) ;;")
        lines.append('  *) echo "nemo-btx: no unit for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
        lines.append("esac")
    else:
        (unit,) = job.units
        lines.append(f"UNIT={_q(unit.name)}; ARGS=({' '.join(_q(a) for a in unit.args)})")
    lines.append(f'CLI=(-m nemo_btx.cli --config-name {_q(target.config_name)} "${{ARGS[@]}}" '
                 f'"${{OVERRIDES[@]}}"{"".join(" " + _q(t) for t in tail)})')

    lines.append("")
    lines += _launch_lines(job, cfg)
    return "\n".join(lines) + "\n" + _RUNNER


def _cli_of(unit: Unit, target: Target) -> List[str]:
    """The unit's command after the interpreter, from pipeline.command (the same as `run`)."""
    nproc = unit.nproc
    unit.nproc = 1
    try:
        cmd = command(unit, target.overrides, target.config_name)
    finally:
        unit.nproc = nproc
    return cmd[1:]


def _launch_lines(job: Job, cfg: ExperimentConfig) -> List[str]:
    c = cfg.cluster
    srun = ['srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" '
            "--kill-on-bad-exit=1"]
    if c.container_image:
        mounts = f" --container-mounts={_q(','.join(c.container_mounts))}" if c.container_mounts else ""
        srun.append(f'--container-image={_q(c.container_image)}{mounts} --container-workdir="$PWD"')
    out = []
    if (job.gpus_per_node or job.nodes > 1) and job.world_size > 1:
        out += [f"# One task per node runs torchrun with {job.procs_per_node} ranks; rendezvous on the first node.",
                'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                "LAUNCH=(" + " ".join(srun),
                f'        "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" '
                f"--nproc-per-node={job.procs_per_node}",
                f'        --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$(({c.rdzv_port} + SLURM_JOB_ID % 1000))" '
                '--rdzv-id="$SLURM_JOB_ID")']
    elif job.world_size > 1:
        out += [f"# One node, no GPU: torchrun --standalone with {job.procs_per_node} ranks (as `nemo-btx run`).",
                "LAUNCH=(" + " ".join(srun),
                f'        "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node={job.procs_per_node})']
    else:
        out += ["# One process.", "LAUNCH=(" + " ".join(srun) + ' "$PYTHON")']
    return out


def render_submit(jobs: List[Job], cfg: ExperimentConfig, target: Target, only_todo: bool) -> str:
    """submit.sh: sbatch every job (only those with units to do when `only_todo`), chained."""
    rd = RunDir(target.run_dir(cfg))
    chosen = [j for j in jobs if j.todo or not only_todo]
    deps = dependencies(jobs, [j.key for j in chosen])
    var = {j.key: j.var for j in jobs}
    lines = ["#!/bin/bash",
             f"# Submit the nemo-btx job chain of {cfg.run.dir} (rendered by `nemo-btx launch`).",
             "# A job starts when its parents completed (afterok); when one fails, the jobs after it",
             "# are cancelled (--kill-on-invalid-dep=yes). Fix the cause and run `nemo-btx launch` with",
             "# the same overrides again: it submits only what is incomplete.",
             *([] if target.workdir else ["# Run it from the directory the jobs should run in (the repository)."]),
             "set -euo pipefail",
             'HERE=$(cd "$(dirname "$0")" && pwd)',
             f"mkdir -p {_dq(rd.slurm_logs)}",
             "submit() { sbatch --parsable \"$@\" | cut -d ';' -f 1; }"]
    for job in chosen:
        opts = []
        if job.is_array and only_todo and job.todo != list(range(len(job.units))):
            par = cfg.cluster.array_parallelism
            opts.append(f"--array={job.array_spec(job.todo)}{f'%{par}' if par else ''}")
        if deps[job.key]:
            # The report shows what exists and names what is missing: it runs after the
            # evaluations however they ended (afterany), not only when all of them succeeded.
            kind = "afterany" if job.stage == "report" else "afterok"
            opts.append(f"--dependency={kind}:" + ":".join(f"${var[d]}" for d in deps[job.key]))
        lines.append(f'{job.var}=$(submit {" ".join(opts) + " " if opts else ""}"$HERE/{job.script}")')
        lines.append(f'echo "{job.key} ${job.var}"')
    return "\n".join(lines) + "\n"


def render_files(cfg: ExperimentConfig, target: Target, jobs: Optional[List[Job]] = None,
                 only_todo: bool = False) -> Dict[str, str]:
    """Every script of the chain by file name (the job scripts and submit.sh)."""
    jobs = jobs if jobs is not None else build_jobs(cfg, target.overrides, target.config_name)
    parents = job_parents(jobs)
    files = {}
    for job in jobs:
        files[job.script] = render_script(job, cfg, target, has_parents=bool(parents.get(job.key)))
    files[SUBMIT_SCRIPT] = render_submit(jobs, cfg, target, only_todo)
    return files


#: The checked-in example chain (slurm/<name>/): what a cluster user reads and submits by hand.
#: The 7B recipe on corpora already tokenized by Megatron-LM's tools/preprocess_data.py (raw
#: .jsonl/.parquet corpora add a tokenize array per domain, sized by the files `launch` finds).
EXAMPLES = {"llama2_7b_h100": [
    "experiment=llama2_7b_h100", "seed.checkpoint=/ckpt/llama2_7b",
    "data.domains.0.prefix=/data/code_text_document", "data.domains.1.prefix=/data/math_text_document",
    "data.domains.2.prefix=/data/wiki_text_document"]}


def example_files(name: str) -> Dict[str, str]:
    """The scripts of an example chain, paths relative to the directory it is submitted from."""
    from nemo_btx.config import load_config

    overrides = EXAMPLES[name]
    cfg = load_config(overrides)
    target = Target(workdir=None, python=cfg.cluster.python or "python", overrides=stage_overrides(overrides))
    return render_files(cfg, target)


if __name__ == "__main__":  # python -m nemo_btx.orchestration.slurm: rewrite slurm/<example>/
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "slurm"
    for example in EXAMPLES:
        out = root / example
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            old.unlink()
        for fname, text in example_files(example).items():
            (out / fname).write_text(text)
            (out / fname).chmod(0o755)
        print(f"wrote {out}")
