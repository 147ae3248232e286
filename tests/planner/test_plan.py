"""`nemo-btx plan` on the paper's recipe, budgets in tokens, and the refusals before anything
runs: the 7B preset without its data or seed, a seed that is not the run's, a layout that does
not fit. Each refusal is one line naming the key (exit 2); nothing is written."""

import subprocess
import sys

import pytest

from conftest import REPO, clean_env, paper_inputs
from nemo_btx.config import load_config
from nemo_btx.config.budgets import stage_iters, tokens_per_step

PAPER = ["experiment=llama2_7b_h100"]


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "nemo_btx.cli", *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=120)


def refused(args, key, tmp_path):
    proc = cli(*args, f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and key in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    return proc.stderr


def test_token_budgets_become_steps():
    cfg = load_config([*PAPER])
    assert tokens_per_step(cfg) == 1024 * 4096
    # The paper's Table 3: 210B code, 201B math, 42B wiki, 80B MoE finetune (4M-token steps).
    assert [stage_iters(cfg, "experts", d) for d in ("code", "math", "wiki")] == [50068, 47923, 10014]
    assert stage_iters(cfg, "finetune") == 19074
    tiny = load_config(["expert.tokens.math=2048", "expert.train_iters=7"])
    assert tokens_per_step(tiny) == 1024
    assert stage_iters(tiny, "experts", "math") == 2 and stage_iters(tiny, "experts", "code") == 7
    assert stage_iters(tiny, "seed") == tiny.seed.train_iters
    out = cli("config", "expert.tokens.math=4096", "finetune.tokens=1e4").stdout
    assert "math: 4096" in out and "# steps at 1,024 tokens per step:" in out
    assert "experts:math 4" in out and "experts:code 100" in out and "finetune 10" in out


def test_plan_of_the_paper_recipe_fits_and_costs(tmp_path):
    proc = cli("plan", *PAPER, *paper_inputs(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha() and "B " in line}
    stages = ["experts:code", "experts:math", "experts:wiki", "mix", "finetune", "upcycle",
              "baselines:upcycle-data", "baselines:upcycle-compute", "dense", "eval:btx"]
    assert [s for s in rows if s in stages] == stages
    for s in stages:
        assert "yes" in rows[s], rows[s]
    assert " NO " not in out
    assert "experts:math                   2.01e+11    47923" in out
    assert "BTX" in out and "Sparse upcycling (compute-matched)" in out
    # The 4x7B MoE on two nodes, the dense stages on one.
    assert rows["finetune"][2] == "16" and rows["experts:math"][2] == "8"


def test_the_7b_preset_refuses_toy_data_and_a_missing_seed(tmp_path):
    inputs = paper_inputs(tmp_path)
    no_data = [a for a in inputs if not a.startswith("data.domains")]
    refused(["validate", *PAPER, *no_data], "data.domains.0.source", tmp_path)
    refused(["run", *PAPER, *no_data], "data.domains.0.source", tmp_path)
    refused(["validate", *PAPER, *inputs, "data.max_chars_per_domain=4000000"], "data.max_chars_per_domain", tmp_path)
    no_seed = [a for a in inputs if not a.startswith("seed.checkpoint")]
    msg = refused(["plan", *PAPER, *no_seed], "seed.checkpoint", tmp_path)
    assert "import-hf" in msg and "seed.from_scratch" in msg
    # Importing is how the seed is made: import-hf is not refused for want of one.
    proc = cli("import-hf", *PAPER, f"hf.path={tmp_path / 'nowhere'}")
    assert "seed.checkpoint" not in proc.stderr


@pytest.mark.slow
def test_a_seed_that_is_not_the_runs_is_refused(tmp_path):
    inputs = paper_inputs(tmp_path)
    refused(["validate", *PAPER, *inputs, "model.rotary_base=500000"], "model.rotary_base", tmp_path)
    refused(["validate", *PAPER, *inputs, "model.ffn_hidden_size=14336"], "model.ffn_hidden_size", tmp_path)
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    (other / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    msg = refused(["validate", *PAPER, *inputs, f"data.tokenizer.path={other}"], "data.tokenizer.path", tmp_path)
    assert "is not the seed's tokenizer" in msg and "sha256" in msg
    refused(["validate", *PAPER, *inputs, "data.tokenizer.kind=bpe"], "data.tokenizer.kind", tmp_path)
    # The run's own seed (a run directory's seed stage output) agrees with itself.
    assert cli("validate", *PAPER, *inputs).returncode == 0


def test_a_layout_over_the_gpu_memory_is_refused(tmp_path):
    inputs = paper_inputs(tmp_path)
    # The 4x7B MoE on one node without recomputation: ~82 GB per GPU predicted.
    msg = refused(["validate", *PAPER, *inputs, "parallel.world_size=8"], "run.layouts", tmp_path)
    assert "over cluster.gpu_memory_gb=80" in msg and "plan.check=false" in msg
    # With full recomputation it fits on one node (the _1node preset), and plan.check=false lets
    # the user run what the planner predicts will not fit.
    for extra in (["run.layouts.finetune=llama2_7b_moe_h100_1node", "run.layouts.mix=llama2_7b_moe_h100_1node",
                   "run.layouts.upcycle=llama2_7b_moe_h100_1node", "run.layouts.baselines=llama2_7b_moe_h100_1node"],
                  ["parallel.world_size=8", "plan.check=false"]):
        proc = cli("validate", *PAPER, *inputs, *extra)
        assert proc.returncode == 0, (extra, proc.stderr)


def test_run_on_one_gpu_machine_fills_it_or_says_why(tmp_path):
    from nemo_btx.orchestration.units import nproc_of, plan

    inputs = paper_inputs(tmp_path)
    over = [*PAPER, *inputs, f"run.dir={tmp_path / 'run'}"]
    units = {u.name: u for u in plan(load_config(over))}
    # One 8-GPU machine: the dense stages take all 8 GPUs (TP2 x DP4), evaluation too (8
    # data-parallel replicas), or one without an eval layout.
    assert nproc_of(units["experts:math"].layout, over, "config", gpus=8, stage="experts") == 8
    assert nproc_of(units["dense"].layout, over, "config", gpus=8, stage="dense") == 8
    assert nproc_of(units["eval:btx"].layout, over, "config", gpus=8, stage="eval") == 8
    assert nproc_of(None, over, "config", gpus=8, stage="eval") == 1
    assert nproc_of("llama2_7b_moe_h100_1node", over, "config", gpus=8, stage="finetune") == 8
    # The two-node MoE layout cannot run on one machine: `run` says so before anything starts.
    msg = refused(["run", *PAPER, *inputs, "eval.missing_data=skip"], "run.layouts.mix=", tmp_path)
    assert "needs 16 GPUs" in msg and "nemo-btx launch" in msg


def test_the_tokenizer_defaults_to_the_seeds(tmp_path):
    from nemo_btx.config.validate import check_config
    from nemo_btx.data.tokenizer import hf_tokenizer_file
    from nemo_btx.model.agreement import check_seed

    inputs = [a for a in paper_inputs(tmp_path) if not a.startswith("data.tokenizer.path")]
    cfg = load_config([*PAPER, *inputs])
    check_config(cfg)
    check_seed(cfg)
    assert hf_tokenizer_file(cfg.data.tokenizer.path, cfg.seed.checkpoint) == \
        tmp_path / "llama2_7b" / "tokenizer" / "tokenizer.json"
    # A seed without a tokenizer of its own: the path must be given.
    (tmp_path / "llama2_7b" / "tokenizer" / "tokenizer.json").unlink()
    refused(["validate", *PAPER, *inputs], "data.tokenizer.path", tmp_path)


def test_mfu_and_step_time_agree():
    from nemo_btx.planner.flops import model_flops_per_token, mfu, step_seconds

    m = load_config([*PAPER]).model
    tokens, gpus, peak = 4 * 1024 * 1024, 8, 989e12
    for util in (0.3, 0.45):
        per_gpu = tokens / (step_seconds(m, tokens, gpus, peak_flops=peak, mfu=util) * gpus)
        assert mfu(m, per_gpu, peak) == pytest.approx(util)
    # Llama-2 7B: ~6 x 6.7e9 FLOPs per token plus attention at 4096 tokens.
    assert 4.5e10 < model_flops_per_token(m) < 5.0e10
