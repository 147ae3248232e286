"""Every config section is checked before anything runs: one bad override, one line, exit 2.

Each case goes through the real command line (`nemo_btx.cli.main`, a few in a subprocess) with
a run directory that must not appear. In-process, the stage function is replaced by one that
fails the test, so a check that is missing cannot start an experiment.
"""

import json
import subprocess
import sys

import pytest

from conftest import clean_env
from nemo_btx import cli
from nemo_btx.config import load_config
from nemo_btx.config.validate import check_config, validate
from nemo_btx.errors import BtxError, ConfigError

MISSING = "/nonexistent/btx-path"

#: (command, override, what the error line starts with after "nemo-btx: config error: ").
CASES = [
    # training stage budgets (seed, expert, job, finetune, baselines)
    ("run", "seed.eval_interval=0", "seed.eval_interval=0:"),
    ("run", "seed.save_interval=0", "seed.save_interval=0:"),
    ("run", "seed.train_iters=0", "seed.train_iters=0:"),
    ("run", "expert.keep_checkpoints=0", "expert.keep_checkpoints=0:"),
    ("train", "job.lr=-1", "job.lr=-1.0:"),
    ("run", "finetune.warmup_iters=-2", "finetune.warmup_iters=-2:"),
    ("run", "baselines.eval_interval=0", "baselines.eval_interval=0:"),
    ("run", "finetune.switch_capacity_factor=0", "finetune.switch_capacity_factor=0.0:"),
    ("run", "finetune.routing=sample_top1", "finetune.routing='sample_top1':"),
    # inputs that must exist
    ("seed", f"seed.checkpoint={MISSING}", f"seed.checkpoint='{MISSING}':"),
    ("train", f"job.init={MISSING}", f"job.init='{MISSING}':"),
    ("run", f"mix.experts=[{MISSING}/a,{MISSING}/b,{MISSING}/c]", f"mix.experts.0='{MISSING}/a':"),
    ("finetune", f"finetune.init={MISSING}", f"finetune.init='{MISSING}':"),
    ("baselines", f"baselines.upcycle={MISSING}", f"baselines.upcycle='{MISSING}':"),
    ("import-hf", f"hf.path={MISSING}", f"hf.path='{MISSING}':"),
    # data
    ("run", "data.valid_fraction=1.5", "data.valid_fraction=1.5:"),
    ("run", "data.domains.0.weight=0", "data.domains.0.weight=0.0:"),
    ("run", "data.domains.1.name=code", "data.domains.1.name='code':"),
    ("run", f"data.domains.2.source={MISSING}/*.jsonl", f"data.domains.2.source='{MISSING}/*.jsonl':"),
    ("run", "data.max_chars_per_domain=0", "data.max_chars_per_domain=0:"),
    ("run", "data.eval_iters=0", "data.eval_iters=0:"),
    ("data", "data.tokenizer.kind=hf", "data.tokenizer.path=None:"),
    # mix
    ("run", "mix.average_weights=[1,2]", "mix.average_weights=[1.0, 2.0]:"),
    ("mix", "mix.split_experts=0", "mix.split_experts=0:"),
    ("mix", "mix.router_init_batches=0", "mix.router_init_batches=0:"),
    ("mix", "mix.threads=0", "mix.threads=0:"),
    # baselines, eval
    ("run", "baselines.which=[dense,dense_compute]", "baselines.which.1='dense_compute':"),
    ("run", "baselines.which=[dense,dense]", "baselines.which.1='dense':"),
    ("eval", "eval.batch_size=0", "eval.batch_size=0:"),
    ("run", "eval.limit=0", "eval.limit=0:"),
    ("run", "eval.max_gen_toks=0", "eval.max_gen_toks=0:"),
    ("eval", "eval.perplexity_batches=0", "eval.perplexity_batches=0:"),
    ("eval", "eval.model=nosuch", "eval.model='nosuch':"),
    # cluster, hf, smoke, run, domain, train, model
    ("launch", "cluster.time=2days", "cluster.time='2days':"),
    ("launch", "cluster.mem=lots", "cluster.mem='lots':"),
    ("export-hf", "hf.max_shard_size=5XB", "hf.max_shard_size='5XB':"),
    ("smoke", "smoke.steps=0", "smoke.steps=0:"),
    ("run", "run.layouts.seed=nosuch", "run.layouts.seed='nosuch':"),
    ("train-expert", "domain=poetry", "domain='poetry':"),
    ("train-expert", "domain_index=7", "domain_index=7:"),
    ("run", "train.adam_eps=0", "train.adam_eps=0.0:"),
    ("run", "model.hidden_dropout=1.5", "model.hidden_dropout=1.5:"),
]


def _stage_must_not_run(*args, **kwargs):
    raise AssertionError("validation passed: the stage was about to run")


def _cli(monkeypatch, capsys, command, *overrides):
    """`nemo-btx command overrides` in this process, with the stage itself stubbed out."""
    text, _, where = cli.COMMANDS[command]
    monkeypatch.setitem(cli.COMMANDS, command, (text, f"{__name__}:_stage_must_not_run", where))
    capsys.readouterr()
    code = cli.main([command, *overrides])
    return code, capsys.readouterr().err


def _one_config_error(code, err, start):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nemo-btx: config error: {start}"), lines[0]


@pytest.mark.parametrize("command,override,start", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_override_is_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path, command,
                                                     override, start):
    rd = tmp_path / "rd"
    code, err = _cli(monkeypatch, capsys, command, f"run.dir={rd}", override)
    _one_config_error(code, err, start)
    assert not rd.exists()
    assert list(tmp_path.iterdir()) == []


def test_cases_cover_every_section():
    sections = {c[1].split(".")[0].split("=")[0] for c in CASES}
    assert len(CASES) >= 30
    assert sections >= {"seed", "expert", "job", "finetune", "baselines", "mix", "data", "eval",
                        "cluster", "hf", "smoke", "run", "domain", "domain_index", "train", "model"}


@pytest.mark.parametrize("command,override,start", [
    ("run", "seed.eval_interval=0", "seed.eval_interval=0:"),
    ("run", "eval.batch_size=0", "eval.batch_size=0:"),
    # finetune would read its input checkpoint first; the plain config error wins.
    ("finetune", "finetune.switch_capacity_factor=-1", "finetune.switch_capacity_factor=-1.0:"),
    ("run", "baselines.which=[dense,bogus]", "baselines.which.1='bogus':"),
])
def test_subprocess_exit_code_one_line_nothing_written(tmp_path, command, override, start):
    rd = tmp_path / "rd"
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", command, f"run.dir={rd}", override],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    _one_config_error(proc.returncode, proc.stderr, start)
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_defaults_and_the_7b_preset_validate(tmp_path):
    from conftest import paper_inputs

    assert validate(load_config([])) == 1
    assert validate(load_config(["experiment=llama2_7b_h100", *paper_inputs(tmp_path)]), world_size=8) == 8


def test_inputs_a_run_writes_itself_are_not_required_up_front(tmp_path):
    """Inside run.dir (or at mix.out) an earlier stage of the same run writes them."""
    rd = tmp_path / "rd"
    check_config(load_config([f"run.dir={rd}", f"finetune.init={rd}/btx/mixed",
                              f"mix.seed_checkpoint={rd}/seed/weights",
                              f"mix.experts=[{rd}/experts/code/weights,{rd}/experts/math/weights,"
                              f"{rd}/experts/wiki/weights]",
                              f"mix.out={tmp_path}/moe", f"baselines.upcycle={tmp_path}/moe"]))
    assert not rd.exists()


def test_user_sources_and_tokenizer_must_exist(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.jsonl").write_text('{"text": "hello"}\n')
    domains = (f"data.domains=[{{name: notes, source: '{tmp_path}/notes'}}, "
               f"{{name: more, source: '{tmp_path}/notes/*.jsonl'}}]")
    check_config(load_config([domains]))
    with pytest.raises(ConfigError) as err:
        check_config(load_config([f"data.domains=[{{name: x, source: '{tmp_path}/empty-dir'}}]"]))
    assert err.value.key == "data.domains.0.source"
    with pytest.raises(ConfigError) as err:
        check_config(load_config(["data.domains=[{name: poetry}]"]))
    assert err.value.key == "data.domains.0.source" and "no builtin corpus" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_config(load_config(["data.tokenizer.kind=hf", f"data.tokenizer.path={tmp_path}"]))
    assert err.value.key == "data.tokenizer.path" and "tokenizer.json" in str(err.value)


def test_switch_capacity_factor_is_reported_under_its_own_key():
    """routed_model puts it into model.moe.capacity_factor; the error names the key set."""
    import dataclasses

    from nemo_btx.model.moe_config import routed_model

    cfg = load_config(["finetune.routing=switch", "finetune.switch_capacity_factor=-0.5"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert err.value.key == "finetune.switch_capacity_factor"
    moe = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, num_experts=4))
    with pytest.raises(ConfigError) as err:
        routed_model(moe, cfg)
    assert err.value.key == "finetune.switch_capacity_factor" and err.value.value == -0.5


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                "intermediate_size": 176, "num_attention_heads": 4, "num_hidden_layers": 2,
                "vocab_size": 256}


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_hf_config_without_a_required_key_names_file_and_key(tmp_path, key):
    from nemo_btx.config.schema import ModelConfig
    from nemo_btx.hf.config import model_config_from_hf, read_config

    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in LLAMA_CONFIG.items() if k != key}))
    where = str(tmp_path / "config.json")
    with pytest.raises(BtxError) as err:
        model_config_from_hf(read_config(tmp_path), ModelConfig(), where=where, name="x")
    msg = str(err.value)
    assert msg.startswith(f"{where}: missing key '{key}'") and "\n" not in msg
    # A present but unusable value is named too, and so is a config.json that is not an object.
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, key: "many"}))
    with pytest.raises(BtxError, match=rf"config\.json: {key}='many': must be a positive integer"):
        model_config_from_hf(read_config(tmp_path), ModelConfig(), where=where, name="x")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(BtxError, match="not a Hugging Face config"):
        read_config(tmp_path)


def test_import_hf_cli_missing_key_is_one_line(monkeypatch, capsys, tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({k: v for k, v in LLAMA_CONFIG.items()
                                                 if k != "hidden_size"}))
    capsys.readouterr()
    code = cli.main(["import-hf", f"run.dir={tmp_path / 'rd'}", f"hf.path={src}", f"hf.out={out}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("nemo-btx:")]
    assert code == 1 and "Traceback" not in err
    assert lines == [f"nemo-btx: error: {src / 'config.json'}: missing key 'hidden_size' (a decoder's "
                     "config.json needs num_hidden_layers, hidden_size, intermediate_size, "
                     "num_attention_heads, vocab_size)"]
    assert not out.exists() and not (tmp_path / "rd").exists()
