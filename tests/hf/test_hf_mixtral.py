"""export-hf of an MoE: MixtralForCausalLM computes the megatron-core MoE's logits, and router
settings Mixtral does not reproduce are refused with one line naming the setting."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env
from hf_models import assert_logits_close, hf_logits, megatron_logits, perturb_norms
from nemo_btx.config import load_config

SMALL_MOE = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=300",
             "model.seq_length=32", "model.moe.num_experts=4", "model.moe.router_topk=2",
             "model.attention_dropout=0.0", "model.hidden_dropout=0.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a tokenizer and a random 4-expert top-2 MoE as its BTX model."""
    from nemo_btx.data.tokenizer import save_tokenizer, train_bpe
    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.distributed import init_runtime
    from nemo_btx.training.checkpoint import save_model_weights

    root = tmp_path_factory.mktemp("run")
    cfg = load_config([f"run.dir={root}", *SMALL_MOE])
    init_runtime(cfg)  # torn down by the suite's per-module fixture
    torch.manual_seed(3)
    (model,) = build_model(cfg, wrap_ddp=False)
    perturb_norms(model.named_parameters())
    with torch.no_grad():  # a router trained away from its small init: distinct top-k choices
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
    save_model_weights([model], root / "btx" / "finetuned" / "weights", cfg.model)
    save_tokenizer(train_bpe(["def f(x): return x\n" * 20, "two plus two is four\n" * 20], 300), root)
    return root


def _export(*overrides):
    from nemo_btx.stages.hf import export_hf

    return export_hf(load_config(list(overrides)))


def _with_moe(src, dst, **moe):
    """A copy of a checkpoint whose marker records other MoE settings."""
    shutil.copytree(src, dst)
    marker = json.loads((dst / "btx_checkpoint.json").read_text())
    marker["model"]["moe"].update(moe)
    (dst / "btx_checkpoint.json").write_text(json.dumps(marker))
    return dst


def test_exported_mixtral_logits_equal_megatron(run):
    from transformers import AutoConfig, AutoTokenizer

    from nemo_btx.data.tokenizer import load_tokenizer

    out = _export(f"run.dir={run}")  # hf.model=btx: the finetuned MoE
    assert out == run / "hf" / "btx"
    config = AutoConfig.from_pretrained(str(out))
    assert (config.architectures, config.num_local_experts, config.num_experts_per_tok) == (
        ["MixtralForCausalLM"], 4, 2)
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (2, 24))
    assert_logits_close(hf_logits(out, tokens), megatron_logits(run / "btx" / "finetuned" / "weights", tokens))
    ours = load_tokenizer(run)
    assert AutoTokenizer.from_pretrained(str(out))("two plus two")["input_ids"] == ours.encode("two plus two")
    assert config.eos_token_id == ours.eod_id


@pytest.mark.parametrize("moe", [dict(router_topk=4), dict(router_topk=4, router_pre_softmax=True)],
                         ids=["soft", "soft-pre-softmax"])
def test_other_exact_routings(run, tmp_path, moe):
    """Every expert active (finetune.routing=soft), with or without pre-softmax: the weights
    sum to 1 already, so Mixtral's renormalisation changes nothing."""
    src = _with_moe(run / "btx" / "finetuned" / "weights", tmp_path / "ckpt", **moe)
    out = _export(f"hf.path={src}", f"hf.out={tmp_path / 'hf'}")
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_logits_close(hf_logits(out, tokens), megatron_logits(src, tokens))


@pytest.mark.parametrize("moe, setting", [
    (dict(router_pre_softmax=True), "model.moe.router_pre_softmax=True"),
    # megatron-core's top-1 needs pre-softmax, so its weight is p_max, Mixtral's is 1
    (dict(router_topk=1, router_pre_softmax=True), "model.moe.router_pre_softmax=True"),
    (dict(capacity_factor=1.5), "model.moe.capacity_factor=1.5"),
    (dict(load_balancing_type="sinkhorn"), "model.moe.load_balancing_type='sinkhorn'"),
    (dict(moe_router_score_function="sigmoid"), "moe_router_score_function='sigmoid'"),
    (dict(moe_router_topk_scaling_factor=2.5), "moe_router_topk_scaling_factor=2.5"),
    (dict(moe_router_enable_expert_bias=True), "moe_router_enable_expert_bias=True"),
    (dict(moe_router_num_groups=2, moe_router_group_topk=1), "moe_router_num_groups=2"),
    (dict(moe_shared_expert_intermediate_size=64), "moe_shared_expert_intermediate_size=64"),
], ids=lambda x: None if isinstance(x, dict) else x.split("=")[0])
def test_export_refuses_router_settings(run, tmp_path, moe, setting):
    from nemo_btx.hf.config import UnsupportedModelError

    src = _with_moe(run / "btx" / "finetuned" / "weights", tmp_path / "ckpt", **moe)
    with pytest.raises(UnsupportedModelError) as err:
        _export(f"hf.path={src}", f"hf.out={tmp_path / 'hf'}")
    message = str(err.value)
    assert f"{src}: {setting}: " in message and "not what MixtralForCausalLM or Qwen3MoeForCausalLM computes" in message
    assert "\n" not in message
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.tmp").exists()


def test_router_tensors_mixtral_lacks_are_refused():
    from nemo_btx.hf.config import UnsupportedModelError
    from nemo_btx.hf.routing import check_routing

    moe = {"num_experts": 4, "router_topk": 2}
    check_routing(moe, ["decoder.layers.mlp.router.weight"], "ckpt")
    for key, what in [("decoder.layers.mlp.router.expert_bias", "an expert bias"),
                      ("decoder.layers.mlp.shared_experts.linear_fc1.weight", "a shared expert")]:
        with pytest.raises(UnsupportedModelError, match=f"ckpt: tensor {key}='present': {what}"):
            check_routing(moe, ["decoder.layers.mlp.router.weight", key], "ckpt")


@pytest.mark.slow
def test_cli_export_refusal_is_one_line(run, tmp_path):
    src = _with_moe(run / "btx" / "finetuned" / "weights", tmp_path / "ckpt", capacity_factor=1.5)
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "export-hf", f"hf.path={src}",
                           f"hf.out={tmp_path / 'hf'}"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("nemo-btx:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"nemo-btx: error: {src}: model.moe.capacity_factor=1.5: token dropping"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_lm_eval_hf_backend_scores_the_export_as_we_do(run, tmp_path):
    """lm-eval's own `hf` backend loads the exported Mixtral and gives the log-likelihoods our
    lm-eval model gives the megatron-core MoE."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from nemo_btx.evaluation.lm import NemoBtxLM

    out = _export(f"run.dir={run}", f"hf.out={tmp_path / 'mixtral'}")
    pairs = [("two plus", " two is four"), ("def f(x):", " return x"), ("", "two plus two")]
    requests = [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    theirs = HFLM(pretrained=str(out), dtype="float32", device="cpu", batch_size=1).loglikelihood(requests)
    ours = NemoBtxLM(str(run / "btx" / "finetuned" / "weights"), run_dir=str(run),
                     precision="fp32").loglikelihood(requests)
    assert len(theirs) == len(ours) == 3
    for (a, greedy_a), (b, greedy_b), pair in zip(theirs, ours, pairs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and greedy_a == greedy_b, (pair, a, b)
