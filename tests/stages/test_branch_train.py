"""data -> seed -> branch -> train-expert on a small fixed budget, through the real CLI.

Checks the BTX premise on the tiny default: every expert beats the seed on its own domain and
does no better than the seed elsewhere (the paper's Table 1 pattern of specialisation and
forgetting). Also the bad inputs of these stages: one clear error, nothing overwritten.
"""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env

# Measured margins of the specialisation checks at this budget: >= 0.21 nats (0.17 at 120/60
# steps, which took 18 s more).
BUDGET = ["data.max_chars_per_domain=600000", "seed.train_iters=80", "seed.eval_interval=40",
          "seed.save_interval=40", "expert.train_iters=40", "expert.eval_interval=20",
          "expert.save_interval=20", "data.eval_iters=2"]
DOMAINS = ["code", "math", "wiki"]


def cli(run_dir, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", args[0], f"run.dir={run_dir}",
                           *BUDGET, *args[1:]], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rd = tmp_path_factory.mktemp("run")
    cli(rd, "data")
    cli(rd, "seed")
    cli(rd, "branch")
    for i in range(len(DOMAINS)):  # as a Slurm array task would: by index
        cli(rd, "train-expert", f"domain_index={i}")
    return rd


def valid_loss(path):
    return json.loads((path / "manifest.json").read_text())["valid_loss"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_experts_specialise_and_forget(run_dir):
    seed = valid_loss(run_dir / "seed")
    table = {"seed": seed}
    for d in DOMAINS:
        table[d] = valid_loss(run_dir / "experts" / d)
    print("\nvalidation perplexity\n" + "\n".join(
        f"{k:>6}: " + "  ".join(f"{dom}={math.exp(v[dom]):8.2f}" for dom in DOMAINS)
        for k, v in table.items()))
    for d in DOMAINS:
        assert table[d][d] < seed[d] - 0.02, f"expert {d} does not beat the seed on {d}"
        for other in DOMAINS:
            if other != d:
                assert table[d][other] > seed[other] - 0.02, f"expert {d} improved {other}"
    # Provenance: experts record their parent; the ledger has one segment per run.
    manifest = json.loads((run_dir / "experts" / "math" / "manifest.json").read_text())
    assert manifest["parent"].endswith("seed") and manifest["domains"] == ["math"]
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in ledger] == ["seed", "expert:code", "expert:math", "expert:wiki"]
    assert all(e["flops"] > 0 and e["tokens"] > 0 and e["device_seconds"] > 0 for e in ledger)


@pytest.mark.slow
def test_rerun_skips_complete_stages(run_dir):
    before = (run_dir / "experts" / "code" / "manifest.json").stat().st_mtime_ns
    proc = cli(run_dir, "train-expert", "domain=code")
    assert "complete, skipping" in proc.stderr
    assert (run_dir / "experts" / "code" / "manifest.json").stat().st_mtime_ns == before


def _one_line_error(proc, *words):
    lines = [x for x in proc.stderr.splitlines() if x.startswith("nemo-btx:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow
def test_bad_inputs_fail_before_any_step(run_dir, tmp_path):
    # Tokenizer larger than the model's vocabulary.
    other = tmp_path / "other"
    shutil.copytree(run_dir / "data", other / "data")
    shutil.copytree(run_dir / "tokenizer", other / "tokenizer")
    _one_line_error(cli(other, "seed", "model.vocab_size=512", check=False),
                    "model.vocab_size=512", "4096")
    assert not (other / "seed").exists()
    # A layout that does not fit the world size (one process).
    _one_line_error(cli(other, "seed", "parallel.tp=2", check=False), "parallel.world_size=1")
    # An incomplete checkpoint as the seed.
    (tmp_path / "half").mkdir()
    _one_line_error(cli(other, "seed", f"seed.checkpoint={tmp_path / 'half'}", check=False),
                    "incomplete checkpoint")
    assert not (other / "seed").exists()
    # A truncated shard in an expert's branched copy: refused at load, nothing written.
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.rmtree(broken / "experts" / "code")
    shutil.copytree(run_dir / "experts" / "code" / "init", broken / "experts" / "code" / "init")
    shard = sorted((broken / "experts" / "code" / "init").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _one_line_error(cli(broken, "train-expert", "domain=code", check=False), "shard truncated")
    assert sorted(p.name for p in (broken / "experts" / "code").iterdir()) == ["init"]
    # Unknown domain and missing data.
    _one_line_error(cli(broken, "train-expert", "domain=poetry", check=False), "domain='poetry'")
    _one_line_error(cli(tmp_path / "empty", "seed", check=False), "nemo-btx data")


@pytest.mark.slow
def test_seed_adopts_an_existing_checkpoint_and_train_runs_on_chosen_domains(run_dir, tmp_path):
    from nemo_btx.training.checkpoint import read_tensors

    other = tmp_path / "adopted"
    shutil.copytree(run_dir / "data", other / "data")
    shutil.copytree(run_dir / "tokenizer", other / "tokenizer")
    cli(other, "seed", f"seed.checkpoint={run_dir / 'experts' / 'math' / 'weights'}")
    a, b = read_tensors(run_dir / "experts" / "math" / "weights"), read_tensors(other / "seed" / "weights")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((other / "seed" / "manifest.json").read_text())["adopted_from"].endswith("weights")
    # A plain run on one domain from those weights, through `nemo-btx train`.
    cli(other, "train", "job.domains=[wiki]", f"job.init={other / 'seed' / 'weights'}",
        "train.train_iters=6", "train.warmup_iters=1", "job.eval_interval=3", "job.save_interval=3")
    manifest = json.loads((other / "train" / "manifest.json").read_text())
    assert manifest["domains"] == ["wiki"] and manifest["steps"] == 6
    assert set(manifest["valid_loss"]) == set(DOMAINS)
