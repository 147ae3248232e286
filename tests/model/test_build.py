"""Dense and MoE GPTModels build on CPU, run forward and backward, and the aux loss trains the router."""

import dataclasses

import pytest
import torch

from nemo_btx.config import load_config
from nemo_btx.model.build import (
    build_model, have_transformer_engine, model_flops_per_token, padded_vocab_size)
from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.vocab_size=200", "model.seq_length=32", "train.micro_batch_size=4",
         "train.global_batch_size=4"]


@pytest.fixture(scope="module")
def runtime():
    from nemo_btx.runtime.distributed import init_runtime, shutdown

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    rt = init_runtime(load_config(SMALL))
    yield rt
    # A raw backward() outside the schedules leaves a 0-dim aux-loss scale behind that breaks
    # the next schedule run in this process.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    shutdown()


def _with_moe(cfg, coeff=0.01, experts=4):
    moe = dataclasses.replace(cfg.model.moe, num_experts=experts, aux_loss_coeff=coeff)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


def _forward(cfg, model):
    (batch,) = rank_microbatches(cfg, synthetic_global_batch(cfg, 0), 0, 1, torch.device("cpu"))
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def test_cpu_uses_local_spec_and_pads_vocab(runtime):
    cfg = load_config(SMALL)
    assert not have_transformer_engine()
    (model,) = build_model(cfg, wrap_ddp=False)
    names = {type(m).__name__ for m in model.modules()}
    assert "RMSNorm" in names and not any(n.startswith("TE") for n in names), names
    assert model.embedding.word_embeddings.weight.shape[0] == padded_vocab_size(cfg.model, 1) == 256
    assert padded_vocab_size(cfg.model, 4) == 512


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_forward_backward_reaches_every_parameter(runtime, moe):
    cfg = load_config(SMALL)
    if moe:
        cfg = _with_moe(cfg)
    torch.manual_seed(0)
    (model,) = build_model(cfg, wrap_ddp=False)
    losses = _forward(cfg, model)
    assert losses.shape == (4, 32)
    assert torch.isfinite(losses).all()
    # An untrained model is near uniform over the padded vocabulary.
    assert abs(losses.mean().item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    losses.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert bool(experts) == moe
    if moe:
        assert len({n.split(".experts.local_experts.")[1].split(".")[0] for n in experts}) == 4


def _router_grads(cfg):
    torch.manual_seed(0)
    (model,) = build_model(cfg, wrap_ddp=False)
    losses = _forward(cfg, model)
    # Zero the language-model loss: whatever reaches the router now comes from the aux loss.
    (losses.sum() * 0.0).backward()
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "router" in n])


def test_aux_loss_reaches_router_and_scales_with_coefficient(runtime):
    cfg = load_config(SMALL)
    g0 = _router_grads(_with_moe(cfg, coeff=0.0))
    g1 = _router_grads(_with_moe(cfg, coeff=0.01))
    g2 = _router_grads(_with_moe(cfg, coeff=0.02))
    assert torch.count_nonzero(g0) == 0
    assert g1.abs().max() > 0
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-4, atol=1e-9)


def test_flops_formula_counts_only_routed_experts():
    cfg = load_config(SMALL)
    m = cfg.model
    dense = model_flops_per_token(m)
    moe2 = model_flops_per_token(_with_moe(cfg).model)
    ffn = 6 * m.num_layers * 3 * m.hidden_size * m.ffn_hidden_size
    router = 6 * m.num_layers * m.hidden_size * 4
    assert moe2 - dense == pytest.approx(ffn + router)
    all_experts = model_flops_per_token(_with_moe(cfg).model, active_experts=4)
    assert all_experts - moe2 == pytest.approx(2 * ffn)


def test_cuda_without_transformer_engine_is_one_error(monkeypatch):
    """On a CUDA machine whose Transformer Engine does not import, the model is not quietly
    built from megatron-core's slow local layers: one line, unless model.allow_local_spec."""
    from nemo_btx.config import load_config
    from nemo_btx.errors import ConfigError
    from nemo_btx.model import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "have_transformer_engine", lambda: False)
    with pytest.raises(ConfigError, match="model.allow_local_spec=False: this machine has CUDA"):
        build.spec_name(load_config([]))
    allowed = load_config(["model.allow_local_spec=true", "model.moe.num_experts=4", "model.moe.grouped_gemm=true"])
    assert build.spec_name(allowed) == "local"
    assert build.transformer_config(allowed).moe_grouped_gemm is False  # no grouped GEMM without TE
    assert build.spec_name(load_config([]), shapes_only=True) == "local"  # a shapes-only model: never TE
    monkeypatch.setattr(build, "have_transformer_engine", lambda: True)
    assert build.spec_name(load_config([])) == "transformer_engine"
