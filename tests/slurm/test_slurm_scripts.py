"""`nemo-btx launch` without a cluster: the rendered chain, its checks, the stop signal."""

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env
from nemo_btx.orchestration.slurm import EXAMPLES

H100 = EXAMPLES["llama2_7b_h100"]


def load(overrides):
    from nemo_btx.config import load_config

    return load_config(list(overrides))


def sbatch_options(script: str) -> dict:
    """`#SBATCH --key=value` lines as {key: value} (flags map to True)."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value or True
    return out


def submissions(submit_sh: str) -> dict:
    """submit.sh -> {stage: (script, [dependencies], --array or None)} in submission order."""
    out = {}
    for line in submit_sh.splitlines():
        m = re.match(r'^(\w+)=\$\(submit (.*)"\$HERE/([\w.-]+)"\)$', line)
        if m:
            stage, opts, script = m.groups()
            deps = re.search(r"--dependency=after(?:ok|any):(\S+)", opts)
            array = re.search(r"--array=(\S+)", opts)
            out[stage] = (script, [d.lstrip("$") for d in deps.group(1).split(":")] if deps else [],
                          array.group(1) if array else None)
    return out


def h100_jobs(tmp_path, extra=()):
    from nemo_btx.orchestration.slurm import Target, build_jobs, render_files, stage_overrides

    overrides = [*H100, f"run.dir={tmp_path}", *extra]
    cfg = load(overrides)
    jobs = build_jobs(cfg, overrides)
    target = Target(workdir="/cluster/nemo-btx", python="python", overrides=stage_overrides(overrides))
    return cfg, jobs, render_files(cfg, target, jobs)


# ---------------------------------------------------------------- the H100 recipe

def test_llama2_7b_h100_chain(tmp_path):
    cfg, jobs, files = h100_jobs(tmp_path)
    domains = [d.name for d in cfg.data.domains]
    by_stage = {j.key: j for j in jobs}
    assert [j.key for j in jobs] == ["tokenizer", "data", "seed", "branch", "experts", "mix", "finetune", "upcycle",
                                     "baselines", "dense", "eval-seed", "eval-experts", "eval-finetune",
                                     "eval-baselines", "eval-dense", "report"]
    # Each model is evaluated by the array of the stage that makes it (BTM with the experts).
    assert {k: [u.item for u in by_stage[k].units] for k in by_stage if k.startswith("eval-")} == {
        "eval-seed": ["seed"], "eval-experts": [f"expert-{d}" for d in domains] + ["btm-top1", "btm-top2"],
        "eval-finetune": ["btx"], "eval-baselines": ["upcycle-data", "upcycle-compute"], "eval-dense": ["dense"]}

    # The experts: one array task per domain, each a full node at TP2 x DP4.
    experts = files[by_stage["experts"].script]
    opts = sbatch_options(experts)
    assert opts["array"] == f"0-{len(domains) - 1}" == "0-2"
    assert opts["nodes"] == "1" and opts["gpus-per-node"] == "8" and opts["ntasks-per-node"] == "1"
    assert "--nproc-per-node=8" in experts and "parallel=llama2_7b_h100" in experts
    for i, d in enumerate(domains):
        assert f"  {i}) UNIT=experts:{d}; ARGS=(train-expert domain={d}) ;;" in experts
    assert "# Layout llama2_7b_h100: tp 2 x pp 1 x cp 1 x dp 4 = 8 processes (1 node x 8 GPUs)" in experts

    # Every GPU job: TP x PP x CP x DP = the GPUs it asks for; the dense stages on one node,
    # the MoE stages at EP4 x TP2 on two (their world size; `nemo-btx plan` says why).
    for job in jobs:
        opts = sbatch_options(files[job.script])
        gpus = int(opts.get("gpus-per-node", 0)) * int(opts["nodes"])
        assert gpus == job.gpus_per_node * job.nodes
        if job.parallel is not None:
            p = job.parallel
            dp = job.world_size // (p.tp * p.pp * p.cp)
            want = 16 if job.layout == "llama2_7b_moe_h100" else 8
            assert p.tp * p.pp * p.cp * dp == job.world_size == gpus == want, job.stage
            assert opts["nodes"] == str(want // 8) and opts["gpus-per-node"] == "8"
            assert f"--nproc-per-node={job.procs_per_node}" in files[job.script]
    for stage in ("mix", "finetune", "upcycle"):
        p = by_stage[stage].parallel
        assert by_stage[stage].layout == "llama2_7b_moe_h100" and (p.tp, p.ep, p.etp) == (2, 4, 1)
    for stage in ("tokenizer", "data", "branch", "report"):  # no GPU asked for
        assert "gpus-per-node" not in sbatch_options(files[by_stage[stage].script])
    eval_opts = sbatch_options(files[by_stage["eval-experts"].script])
    # each evaluated model on a whole node: 8 data-parallel replicas under torchrun
    assert eval_opts["array"] == "0-4" and eval_opts["gpus-per-node"] == "8" and eval_opts["nodes"] == "1"
    assert by_stage["eval-experts"].layout == "eval_h100_node"
    assert "--nproc-per-node=8" in files[by_stage["eval-experts"].script]
    # The MoE baselines: one array at the MoE layout; the dense one its own job at a dense layout.
    assert sbatch_options(files[by_stage["baselines"].script])["array"] == "0-1"
    assert by_stage["baselines"].layout == "llama2_7b_moe_h100" and by_stage["dense"].layout == "llama2_7b_h100"
    assert "array" not in sbatch_options(files[by_stage["dense"].script])

    # The chain: afterok on the parents, submitted after them; a failure cancels what follows,
    # except the report, which runs after the evaluations however they ended (and names what
    # is missing).
    assert '--dependency=afterany:$eval_seed:$eval_experts:$eval_finetune:$eval_baselines:$eval_dense' \
        in files["submit.sh"]
    assert files["submit.sh"].count("afterany") == 1
    subs = submissions(files["submit.sh"])
    assert list(subs) == [j.var for j in jobs]
    # An evaluation waits only for the stage that makes its models: the seed's while the
    # experts train, the experts' (and BTM's) while BTX and the baselines train.
    assert {s: deps for s, (_, deps, _) in subs.items()} == {
        "tokenizer": [], "data": ["tokenizer"], "seed": ["data"], "branch": ["seed"], "experts": ["branch"], "mix": ["experts"],
        "finetune": ["mix"], "upcycle": ["seed"], "baselines": ["finetune", "upcycle"], "dense": ["finetune"],
        "eval_seed": ["seed"], "eval_experts": ["experts"], "eval_finetune": ["finetune"],
        "eval_baselines": ["baselines"], "eval_dense": ["dense"],
        "report": ["eval_seed", "eval_experts", "eval_finetune", "eval_baselines", "eval_dense"]}
    for job in jobs[1:]:
        assert sbatch_options(files[job.script])["kill-on-invalid-dep"] == "yes"
    assert "kill-on-invalid-dep" not in sbatch_options(files[jobs[0].script])
    # Requeue before the time limit, logs that survive it, the site's settings.
    for job in jobs:
        opts = sbatch_options(files[job.script])
        assert opts["requeue"] is True and opts["signal"] == "B:USR1@600"
        assert opts["mem"] == "0"  # the preset asks for a node's memory (saves stage in host memory)
        assert opts["chdir"] == "/cluster/nemo-btx" and opts["open-mode"] == "append"
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in experts
    assert sbatch_options(files[by_stage["experts"].script])["time"] == "1-00:00:00"
    assert sbatch_options(files[by_stage["report"].script])["time"] == "12:00:00"


def test_nodes_and_layout_world_sizes(tmp_path):
    from nemo_btx.errors import ConfigError

    _, jobs, files = h100_jobs(tmp_path, ["cluster.nodes=4", "cluster.partition=gpu", "cluster.account=btx",
                                          "cluster.cpu_partition=cpu"])
    experts = next(j for j in jobs if j.stage == "experts")
    assert (experts.nodes, experts.world_size) == (4, 32)
    assert "tp 2 x pp 1 x cp 1 x dp 16 = 32 processes (4 nodes x 8 GPUs)" in experts.layout_text()
    opts = sbatch_options(files[experts.script])
    assert (opts["nodes"], opts["partition"], opts["account"]) == ("4", "gpu", "btx")
    assert sbatch_options(files["02-data.sbatch"])["partition"] == "cpu"
    # A data job's workers tokenize one chunk per core: a node's worth of CPUs by default.
    assert sbatch_options(files["02-data.sbatch"])["cpus-per-task"] == "64"
    # 3 GPUs a node cannot hold TP=2 ranks evenly.
    with pytest.raises(ConfigError, match=r"^cluster.nodes=1: .*multiple of 2 processes"):
        h100_jobs(tmp_path, ["cluster.gpus_per_node=3"])
    # A layout with a fixed world size sets the nodes: parallel.world_size=16 -> 2 nodes.
    _, jobs, _ = h100_jobs(tmp_path, ["parallel.world_size=16"])
    assert next(j for j in jobs if j.stage == "seed").nodes == 2


def test_checked_in_examples_are_current():
    from nemo_btx.orchestration.slurm import EXAMPLES, example_files

    for name in EXAMPLES:
        folder = REPO / "slurm" / name
        want = example_files(name)
        have = {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}
        assert have == want, (f"slurm/{name}/ is out of date with the renderer: "
                              "run `python -m nemo_btx.orchestration.slurm`")
        assert all(os.access(folder / f, os.X_OK) for f in want)


# ---------------------------------------------------------------- the scripts run the run's commands

def fake_bin(tmp_path) -> Path:
    """srun/scontrol stand-ins that record the command line the job script would start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_OUT"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node001\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_script(script: Path, tmp_path, task=None, **env):
    bin_dir = fake_bin(tmp_path) if not (tmp_path / "bin").exists() else tmp_path / "bin"
    out = tmp_path / "argv.txt"
    e = clean_env(**{"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(out), "SLURM_JOB_ID": "4242",
                     "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "node001", **env})
    if task is not None:
        e["SLURM_ARRAY_TASK_ID"] = str(task)
    proc = subprocess.run(["bash", str(script)], env=e, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out.read_text().splitlines()


def test_every_task_runs_the_command_nemo_btx_run_runs(tmp_path):
    """Run each rendered job script with a fake srun: the argv it starts equals pipeline.command()."""
    from nemo_btx.orchestration.slurm import Target, build_jobs, render_files
    from nemo_btx.orchestration.units import command

    rd = tmp_path / "run"
    overrides = [f"run.dir={rd}", "baselines.which=[dense]", "cluster.time=10"]
    cfg = load(overrides)
    jobs = build_jobs(cfg, overrides)
    target = Target.for_launch(cfg, overrides, "config")
    assert "cluster.time=10" not in target.overrides  # cluster.* only shapes the jobs
    files = render_files(cfg, target, jobs)
    (tmp_path / "s").mkdir()
    for name, text in files.items():
        (tmp_path / "s" / name).write_text(text)
    for job in jobs:
        for i, unit in enumerate(job.units):
            argv = run_script(tmp_path / "s" / job.script, tmp_path, task=i if job.is_array else None)
            want = command(unit, target.overrides, "config")  # with torchrun when nproc > 1
            srun_end = argv.index(sys.executable)
            assert argv[srun_end:] == want, unit.name
    events = (rd / "slurm" / "events.jsonl").read_text().splitlines()
    assert len(events) == 2 * sum(len(j.units) for j in jobs)


def test_gpu_job_starts_torchrun_per_node(tmp_path):
    _, jobs, files = h100_jobs(tmp_path / "run", ["cluster.nodes=2"])
    script = tmp_path / "experts.sbatch"
    script.write_text(files["05-experts.sbatch"])
    argv = run_script(script, tmp_path, task=1, SLURM_NNODES="2")
    assert argv[:5] == ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--kill-on-bad-exit=1", "python"]
    assert argv[5:12] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                          "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29742", "--rdzv-id=4242"]
    assert argv[12:] == ["-m", "nemo_btx.cli", "--config-name", "config", "train-expert", "domain=math",
                         *H100, f"run.dir={tmp_path / 'run'}", "parallel=llama2_7b_h100"]


def test_cpu_cluster_spreads_processes_over_nodes(tmp_path):
    """cluster.nodes=2 on a CPU cluster: a 2-process layout runs one process per node (srun, one
    torchrun per node, c10d rendezvous on the first); a one-process stage stays on one node."""
    from nemo_btx.orchestration.slurm import Target, build_jobs, render_files

    rd = tmp_path / "run"
    overrides = [f"run.dir={rd}", "baselines.which=[dense]", "run.layouts.mix=ep2", "run.layouts.finetune=ep2",
                 "cluster.nodes=2"]
    cfg = load(overrides)
    jobs = {j.key: j for j in build_jobs(cfg, overrides)}
    files = render_files(cfg, Target.for_launch(cfg, overrides, "config"), list(jobs.values()))
    for stage in ("mix", "finetune"):
        job = jobs[stage]
        assert (job.nodes, job.procs_per_node, job.gpus_per_node) == (2, 1, 0)
        opts = sbatch_options(files[job.script])
        assert opts["nodes"] == "2" and opts["cpus-per-task"] == "1" and "gpus-per-node" not in opts
        assert "2 processes (2 nodes, no GPU)" in files[job.script]
        script = tmp_path / f"{stage}.sbatch"
        script.write_text(files[job.script])
        argv = run_script(script, tmp_path, SLURM_NNODES="2")
        assert argv[4:11] == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                              "--rdzv-backend=c10d", f"--rdzv-endpoint=node001:{29500 + 4242 % 1000}"]
    assert (jobs["seed"].nodes, jobs["seed"].procs_per_node) == (1, 1)
    assert "torch.distributed.run" not in files[jobs["seed"].script]


# ---------------------------------------------------------------- configuration errors

@pytest.mark.parametrize("override,key", [
    ("cluster.time=2days", "cluster.time"),
    ("cluster.eval_time=1:00:00:00", "cluster.eval_time"),
    ("cluster.gpus_per_node=-1", "cluster.gpus_per_node"),
    ("cluster.nodes=0", "cluster.nodes"),
    ("cluster.nodes=3", "cluster.nodes"),  # a CPU cluster: mix's 2 processes do not spread over 3
    ("cluster.partition='gpu a'", "cluster.partition"),
    ("cluster.env=[NCCL_DEBUG]", "cluster.env.0"),
    ("cluster.sbatch_args=[exclusive]", "cluster.sbatch_args.0"),
    ("cluster.signal_seconds=-5", "cluster.signal_seconds"),
])
def test_bad_cluster_config_is_one_error_naming_the_key(tmp_path, override, key):
    from nemo_btx.errors import ConfigError
    from nemo_btx.orchestration.slurm import build_jobs

    overrides = [f"run.dir={tmp_path}", override]
    with pytest.raises(ConfigError) as err:
        build_jobs(load(overrides), overrides)
    assert err.value.key == key


def test_cli_dry_run_and_errors(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nemo_btx.cli", "launch", f"run.dir={tmp_path}", *args],
                              cwd=REPO, env=clean_env(PATH=str(tmp_path / "no-slurm")), capture_output=True, text=True,
                              timeout=120)

    proc = cli("cluster.time=2days", "cluster.dry_run=true")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("nemo-btx: config error: cluster.time='2days'")
    proc = cli("cluster.dry_run=true")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "slurm").glob("*.s*"))
    assert names[0] == "01-tokenizer.sbatch" and "submit.sh" in names and "report" in names[-2]
    assert not (tmp_path / "slurm" / "jobs.json").exists() and not (tmp_path / "config.yaml").exists()
    # Without Slurm, submitting says what to do instead.
    proc = cli()
    assert proc.returncode == 1 and "sbatch is not on PATH" in proc.stderr


def test_dependencies_skip_complete_stages(tmp_path):
    from nemo_btx.orchestration.slurm import dependencies

    _, jobs, _ = h100_jobs(tmp_path)
    assert dependencies(jobs, ["experts", "mix", "finetune", "baselines", "eval-finetune", "eval-dense",
                               "report"]) == {
        "experts": [], "mix": ["experts"], "finetune": ["mix"], "baselines": ["finetune"],
        "eval-finetune": ["finetune"], "eval-dense": ["finetune"],  # (dense, not submitted: its parent)
        # the report: the submitted evaluations, and the nearest submitted parents of the others
        "report": ["experts", "baselines", "eval-finetune", "eval-dense"]}
    assert dependencies(jobs, ["data", "eval-seed", "report"]) == {"data": [], "eval-seed": ["data"],
                                                                  "report": ["data", "eval-seed"]}
    assert dependencies(jobs, ["tokenizer", "seed"]) == {"tokenizer": [], "seed": ["tokenizer"]}


# ---------------------------------------------------------------- the stop request

def test_stop_request_from_signal_or_file(tmp_path, monkeypatch):
    from nemo_btx.runtime import preemption as signals

    stop = tmp_path / "stop"
    monkeypatch.setenv(signals.STOP_FILE_ENV, str(stop))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signals.reset()
        signals.install()
        assert not signals.stop_requested()
        stop.touch()  # what the job script does on USR1
        assert signals.stop_requested()
        stop.unlink()
        os.kill(os.getpid(), signal.SIGUSR1)  # USR1 straight to the process
        assert signals.stop_requested()
        with pytest.raises(SystemExit) as exit_:
            raise signals.Requeue()
        assert exit_.value.code == signals.EXIT_REQUEUE == 75
    finally:
        signals.reset()
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_sees_a_stop_request_of_one(torchrun, tmp_path):
    """A signal that reached one rank stops all of them at the same step (the all-reduce)."""
    torchrun(REPO / "tests" / "slurm" / "signals_worker.py", [tmp_path], nproc=2, timeout=120)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False True", "False True"]
