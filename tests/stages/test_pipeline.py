"""`nemo-btx run`: the plan, skipping and redoing stages, and kill-then-rerun = never killed."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SMALL_EXPERIMENT as SMALL, SMALL_RUN, clean_env, replay_hint

def nemo_run(rd, *extra, check=True, timeout=1200):
    """`nemo-btx run` of the session's small experiment (conftest's SMALL_RUN) in `rd`."""
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "run", f"run.dir={rd}", *SMALL_RUN, *extra],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def load_run(rd):
    """The config of the session's small experiment (SMALL_RUN) in `rd`."""
    from nemo_btx.config import load_config

    return load_config([*SMALL_RUN, f"run.dir={rd}"])


def load(overrides=()):
    from nemo_btx.config import load_config

    return load_config([*SMALL, *overrides])


# ---------------------------------------------------------------- plan and selection (fast)

def test_plan_orders_every_stage_and_model(tmp_path):
    from nemo_btx.orchestration.units import STAGES, plan

    units = plan(load([f"run.dir={tmp_path}"]))
    names = [u.name for u in units]
    # The tiny default's domains are one piece each: tokenized and merged by one unit per domain.
    assert names[:4] == ["tokenizer", "data:code", "data:math", "data:wiki"]
    names = names[3:]
    # Each model is evaluated right after the unit that makes it (BTM once every expert is
    # there), not after every baseline.
    assert names == ["data:wiki", "seed", "eval:seed", "branch", "experts:code", "eval:expert-code",
                     "experts:math", "eval:expert-math", "experts:wiki", "eval:expert-wiki",
                     "eval:btm-top1", "eval:btm-top2", "mix", "finetune", "eval:btx", "upcycle",
                     "baselines:upcycle-data", "eval:upcycle-data", "baselines:upcycle-compute",
                     "eval:upcycle-compute", "dense", "eval:dense", "report"]
    # Apart from the evaluations, stage order is the order of STAGES, and every unit comes
    # after the units it needs.
    order = [STAGES.index(u.stage) for u in units if u.stage != "eval"]
    assert order == sorted(order)
    seen = set()
    for u in units:
        assert set(u.needs) <= seen, u.name
        seen.add(u.name)
    assert set(units[names.index("seed") + 3].needs) == {"data:code", "data:math", "data:wiki"}
    # Without upcycling baselines there is no upcycle stage and no upcycled model to evaluate.
    names = [u.name for u in plan(load([f"run.dir={tmp_path}", "baselines.which=[dense]"]))]
    assert "upcycle" not in names and "eval:upcycle-data" not in names and "eval:dense" in names


def test_a_large_domain_is_a_tokenize_array_then_a_merge(tmp_path):
    """A domain of several units: one tokenize unit each (a Slurm array), then its merge."""
    from nemo_btx.orchestration.slurm import build_jobs
    from nemo_btx.orchestration.units import plan, select

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"part{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i}.{j} " * 40}) + "\n"
                                                       for j in range(3)))
    overrides = [f"run.dir={tmp_path / 'run'}", "data.max_chars_per_domain=null",
                 f"data.domains=[{{name: code, max_documents: 50}}, {{name: big, source: '{corpus}'}}]",
                 "data.chunk_size=1KB", "data.unit_size=2KB"]
    units = plan(load(overrides))
    names = [u.name for u in units]
    tokenize = [n for n in names if n.startswith("tokenize:")]
    assert tokenize == [f"tokenize:big:{k}" for k in range(len(tokenize))] and len(tokenize) >= 3
    assert names[:len(tokenize) + 1] == ["tokenizer", *tokenize]
    by = {u.name: u for u in units}
    assert set(by["data:big"].needs) == {"tokenizer", *tokenize}
    assert by["data:code"].needs == ("tokenizer",) and by["data:code"].args[1] == "data.step=domain"
    assert by["tokenize:big:1"].args == ["data", "data.step=tokenize", "data.unit=big:1"]
    assert [u.name for u in select(units, None, "tokenize:big:1")] == ["tokenize:big:1"]
    assert select(units, "tokenize", None)[0].name == "tokenize:big:0"
    # On Slurm: the tokenize units are one array job, the merges another, after it.
    jobs = {j.stage: j for j in build_jobs(load(overrides), overrides)}
    assert [u.name for u in jobs["tokenize"].units] == tokenize and jobs["tokenize"].is_array
    assert [u.item for u in jobs["data"].units] == ["code", "big"]


def test_select_from_and_only(tmp_path):
    from nemo_btx.errors import ConfigError
    from nemo_btx.orchestration.units import plan, select

    units = plan(load([f"run.dir={tmp_path}"]))
    # --from STAGE: it and what follows in plan order, but not the evaluations of models made
    # before it (the seed's, the experts'), which it does not change.
    assert [u.name for u in select(units, "finetune", None)] == [
        "finetune", "eval:btx", "upcycle", "baselines:upcycle-data", "eval:upcycle-data",
        "baselines:upcycle-compute", "eval:upcycle-compute", "dense", "eval:dense", "report"]
    assert [u.name for u in select(units, "eval", None)] == [u.name for u in units if u.stage in ("eval", "report")]
    assert [u.name for u in select(units, None, "eval:btx,report")] == ["eval:btx", "report"]
    assert [u.name for u in select(units, None, "experts")] == ["experts:code", "experts:math",
                                                              "experts:wiki"]
    assert [u.name for u in select(units, "experts:math", None)][0] == "experts:math"
    assert select(units, None, None) == []
    with pytest.raises(ConfigError, match="--from.*must be a stage"):
        select(units, "sead", None)
    with pytest.raises(ConfigError, match="experts has: code, math, wiki"):
        select(units, None, "experts:physics")
    with pytest.raises(ConfigError, match="not both"):
        select(units, "mix", "eval")


def test_eval_models_plans_only_their_evaluations(tmp_path):
    from nemo_btx.config import validate
    from nemo_btx.errors import ConfigError
    from nemo_btx.orchestration.units import plan

    units = plan(load([f"run.dir={tmp_path}", "eval.models=[seed,btm-top2,btx]"]))
    evals = [u.name for u in units if u.stage == "eval"]
    assert evals == ["eval:seed", "eval:btm-top2", "eval:btx"]
    assert units[-1].name == "report" and set(units[-1].needs) == set(evals)
    assert len(units) == len(plan(load([f"run.dir={tmp_path}"]))) - 7  # 10 evaluations by default
    with pytest.raises(ConfigError, match=r"eval\.models\.1.*one of seed"):
        validate(load(["eval.models=[seed,expert-physics]"]))
    # A baseline the run does not train is no evaluation either (each baselines unit runs with
    # baselines.which=[its own], so the name cannot be refused).
    units = plan(load([f"run.dir={tmp_path}", "eval.models=[upcycle-data,dense]", "baselines.which=[dense]"]))
    assert [u.name for u in units if u.stage == "eval"] == ["eval:dense"]


def test_a_general_domain_trains_no_expert(tmp_path):
    """data.domains.<i>.expert=false: data for the seed, the finetune and the baselines, no expert."""
    from nemo_btx.config.validate import check_config
    from nemo_btx.config.schema import expert_domains
    from nemo_btx.errors import ConfigError
    from nemo_btx.mixing.recipe import mix_recipe, upcycle_recipe
    from nemo_btx.orchestration.units import plan
    from nemo_btx.run_dir import RunDir
    from nemo_btx.stages.common import domain_names, resolve_domain

    cfg = load([f"run.dir={tmp_path}", "data.domains.2.expert=false"])
    names = [u.name for u in plan(cfg)]
    assert "experts:wiki" not in names and {"experts:code", "experts:math", "data:wiki"} <= set(names)
    assert expert_domains(cfg) == ["code", "math"] and domain_names(cfg) == ["code", "math", "wiki"]
    assert mix_recipe(cfg).num_experts == 3 and upcycle_recipe(cfg).num_experts == 3  # 2 experts + seed
    models = [m.name for m in RunDir.of(cfg).models(expert_domains(cfg))]
    assert "expert-wiki" not in models and "expert-math" in models
    # domain_index counts the experts (the experts array's task id).
    assert resolve_domain(load([f"run.dir={tmp_path}", "data.domains.0.expert=false", "domain_index=0"])) == "math"
    for bad, key in ((["domain=wiki"], "domain"), (["expert.tokens.wiki=1e6"], "expert.tokens.wiki"),
                     ([f"data.domains.{i}.expert=false" for i in range(3)], "data.domains")):
        with pytest.raises(ConfigError, match=key):
            check_config(load([f"run.dir={tmp_path}", "data.domains.2.expert=false", *bad]))


def test_only_runs_the_missing_needs_first(tmp_path):
    from nemo_btx.orchestration.units import plan, select, with_missing_needs

    units = plan(load([f"run.dir={tmp_path}"]))
    data = select(units, None, "data")
    assert [u.name for u in with_missing_needs(units, data)] == ["tokenizer", "data:code", "data:math",
                                                                 "data:wiki"]
    # A complete need is not redone; one two steps up still is.
    by_name = {u.name: u for u in units}
    by_name["tokenizer"].done = lambda: True
    assert [u.name for u in with_missing_needs(units, data)] == [u.name for u in data]
    names = [u.name for u in with_missing_needs(units, select(units, None, "experts:math"))]
    assert names == ["data:code", "data:math", "data:wiki", "seed", "branch", "experts:math"]


def test_multi_rank_layouts_run_under_torchrun(tmp_path):
    from nemo_btx.orchestration.units import command, nproc_of, plan

    assert nproc_of("ep2", SMALL, "config") == 2
    assert nproc_of(None, SMALL, "config") == 1
    units = {u.name: u for u in plan(load([f"run.dir={tmp_path}"]))}
    ft = units["finetune"]
    assert ft.layout == "ep2" and units["seed"].layout is None
    ft.nproc = 2
    cmd = command(ft, ["a=1"], "config")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-3:] == ["finetune", "a=1", "parallel=ep2"]
    assert command(units["seed"], [], "config")[1:] == ["-m", "nemo_btx.cli", "--config-name", "config", "seed"]


def test_move_aside_keeps_outputs_and_the_branched_seed(tmp_path):
    from nemo_btx.orchestration.local import move_aside
    from nemo_btx.orchestration.units import plan, select
    from nemo_btx.run_dir import RunDir

    units = plan(load([f"run.dir={tmp_path}"]))
    (tmp_path / "experts" / "math" / "init").mkdir(parents=True)
    (tmp_path / "experts" / "math" / "weights").mkdir()
    (tmp_path / "experts" / "math" / "manifest.json").write_text("{}")
    (tmp_path / "btx" / "mixed").mkdir(parents=True)
    (tmp_path / "btx" / "mixed" / "manifest.json").write_text("{}")
    stamp = move_aside(select(units, "experts:math", None), RunDir(tmp_path))
    assert (tmp_path / "experts" / "math" / "init").is_dir()
    assert not (tmp_path / "experts" / "math" / "manifest.json").exists()
    assert (stamp / "experts" / "math" / "manifest.json").is_file()
    assert (stamp / "experts" / "math" / "weights").is_dir()
    assert (stamp / "btx" / "mixed" / "manifest.json").is_file() and not (tmp_path / "btx").joinpath("mixed").exists()


def test_refuses_a_run_dir_of_another_experiment(tmp_path):
    from nemo_btx.errors import ConfigError
    from nemo_btx.orchestration.experiment import check_same_experiment as _check_same_experiment

    _check_same_experiment(load([f"run.dir={tmp_path}"]), tmp_path, redo=False)
    # Where a stage runs does not change what it computes.
    _check_same_experiment(load([f"run.dir={tmp_path}", "run.layouts.mix=null"]), tmp_path, redo=False)
    with pytest.raises(ConfigError, match="another config.*seed.train_iters"):
        _check_same_experiment(load([f"run.dir={tmp_path}", "seed.train_iters=13"]), tmp_path, redo=False)
    # --from accepts the new config and records it.
    _check_same_experiment(load([f"run.dir={tmp_path}", "seed.train_iters=13"]), tmp_path, redo=True)
    assert "train_iters: 13" in (tmp_path / "config.yaml").read_text()


def test_cli_errors_are_one_line(tmp_path):
    for args, key in ((["run", "--only", "nope"], "--only"), (["seed", "--from", "mix"], "--from/--only")):
        proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", *args, f"run.dir={tmp_path}"],
                              cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and key in proc.stderr
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- the whole run (slow)

def final_numbers(rd: Path) -> dict:
    """Every number the experiment produces, without wall times."""
    from nemo_btx.training.budget import stage_totals

    out = {}
    for results in sorted(rd.glob("eval/*/results.json")):
        data = json.loads(results.read_text())
        ppl = data["nemo_btx"]["perplexity"]
        scores = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                  for task, metrics in data.get("results", {}).items()}
        out[f"eval/{results.parent.name}"] = {"perplexity": {d: v["perplexity"] for d, v in ppl.items()},
                                    "scores": scores}
    for manifest in sorted(rd.glob("**/manifest.json")):
        if manifest.relative_to(rd).parts[0] == "replaced":  # outputs `--from` moved aside
            continue
        data = json.loads(manifest.read_text())
        if "valid_loss" in data:
            out[f"valid/{manifest.parent.relative_to(rd)}"] = data["valid_loss"]
    routing = rd / "btx" / "finetuned" / "routing.json"
    out["routing"] = json.loads(routing.read_text())["fractions"]
    out["ledger"] = sorted((e["out"], e["tokens"], e["flops"])
                           for e in stage_totals(rd))
    return out


@pytest.fixture(scope="module")
def uninterrupted(small_experiment):
    return small_experiment


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1500)
def test_run_completes_every_stage(uninterrupted):
    from nemo_btx.orchestration.units import plan

    rd, _, proc = uninterrupted
    cfg = load_run(rd)
    assert all(u.done() for u in plan(cfg))
    for u in plan(cfg):
        assert (rd / "logs" / f"{u.name.replace(':', '-')}.log").is_file(), u.name
    # The finetune ran expert-parallel on 2 processes, as the layout asked.
    ft_log = (rd / "logs" / "finetune.log").read_text()
    assert "--nproc-per-node=2" in ft_log and "parallel=ep2" in ft_log
    finetune = [json.loads(x) for x in (rd / "ledger.jsonl").read_text().splitlines()
                if json.loads(x)["stage"] == "finetune"]
    assert finetune[-1]["world_size"] == 2
    # The progress display named every stage as it went.
    for name in ("seed", "experts:math", "finetune on 2 processes (ep2)", "eval:btx", "report"):
        assert name in proc.stderr, name
    # Running again does nothing and says so.
    again = nemo_run(rd)
    assert "nothing to do" in again.stderr
    for number in final_numbers(rd)["eval/seed"]["perplexity"].values():
        assert math.isfinite(number)


#: Where the killed run starts redoing the reference run (a copy of it): every stage from this
#: one on (`run --from`), so a kill can land in any of them (the mix, the MoE finetune at EP=2,
#: the upcycling, the baselines, the evaluations, the report). The stages before are killed in
#: tests of their own, which cost less than redoing most of the run: tokenization (tests/data,
#: tests/slurm), the seed's and experts' training (tests/training/test_resume.py, the Slurm
#: preemption of a 2-node expert job).
REDO_FROM = ["mix", "finetune", "upcycle", "baselines", "dense", "eval"]


def unit_seconds(stderr: str) -> dict:
    """{unit name: seconds} from `run`'s progress lines ("[6/26] eval:seed: done (10 s)")."""
    out = {}
    for line in stderr.splitlines():
        if ": done (" in line and "] " in line:
            name, _, rest = line.split("] ", 1)[1].partition(": done (")
            out[name] = float(rest.split(" s)")[0])
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_kill_then_rerun_equals_uninterrupted(uninterrupted, tmp_path, test_rng):
    """A copy of the finished run redoes every stage from a random one on (`--from`), is killed
    (SIGKILL, children included) at a random moment of that, then run again: the same numbers
    everywhere as the run that was never interrupted. (Redoing from a random stage instead of
    from scratch costs about a third of the run; over suite runs every stage of REDO_FROM is
    drawn.)"""
    from nemo_btx.orchestration.units import plan, select

    ref_dir, _, ref_proc = uninterrupted
    rd = tmp_path / "tiny"
    shutil.copytree(ref_dir, rd, symlinks=True)
    stage = test_rng.choice(REDO_FROM)
    redo = [u.name for u in select(plan(load_run(rd)), stage, None)]
    took = unit_seconds(ref_proc.stderr)
    expected = sum(took.get(name, 5.0) for name in redo)
    when = test_rng.uniform(1, expected * 0.8)
    hint = f"redo --from {stage} ({len(redo)} units, {expected:.0f} s), killed at {when:.1f} s ({replay_hint()})"
    proc = subprocess.Popen([sys.executable, "-m", "nemo_btx.cli", "run", f"run.dir={rd}", *SMALL_RUN,
                             "--from", stage], cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "killed.log").open("w"))
    try:
        proc.wait(timeout=when)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        pytest.fail(f"the redo finished before the kill: nothing was tested; {hint}")
    print(hint)
    # Some of what the killed run redoes is gone (moved aside), or the kill tested nothing.
    assert not all(u.done() for u in plan(load_run(rd))), hint
    nemo_run(rd)
    got, ref = final_numbers(rd), final_numbers(ref_dir)
    assert got.keys() == ref.keys(), hint
    for key in ref:
        assert got[key] == ref[key], f"{key} differs; {hint}"
    report = json.loads((rd / "report" / "report.json").read_text())
    ref_report = json.loads((ref_dir / "report" / "report.json").read_text())
    assert without_times(report["tables"]) == without_times(ref_report["tables"])


def without_times(obj):
    """Report tables minus wall-clock figures (device-hours, seconds), which never repeat."""
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items()
                if not any(t in str(k) for t in ("hours", "wall", "device", "seconds"))}
    if isinstance(obj, list):
        return [without_times(v) for v in obj if not (isinstance(v, dict) and any(
            t in str(v.get("key", "")) for t in ("hours", "wall", "device", "seconds")))]
    return obj
