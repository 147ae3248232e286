"""Parameters per rank by arithmetic (nemo_btx/planner/params.py) equal what megatron-core builds.

Every rank's model is built for real on the meta device (no memory, no init cost) inside a
one-process "fake" torch.distributed group of the layout's world size: megatron-core's parallel
state, layer specs and GPTModel are the real ones, only no collective ever runs. Dense and MoE,
tied and untied embeddings, GQA, at TP/PP/VP/EP/ETP layouts, on every pipeline stage.
"""

import pytest
import torch

from nemo_btx.config import load_config
from nemo_btx.config.validate import min_world_size
from nemo_btx.planner.params import rank_params, total_params

SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=96",
         "model.num_attention_heads=8", "model.vocab_size=1000", "model.make_vocab_size_divisible_by=64"]
MOE = ["model.moe.num_experts=4"]

LAYOUTS = [
    ([], []),
    ([], ["parallel.tp=2"]),
    ([], ["parallel.pp=2"]),
    ([], ["parallel.tp=2", "parallel.pp=2", "parallel.vp=2"]),
    (["model.num_query_groups=2", "model.untie_embeddings_and_output_weights=false"], ["parallel.pp=2"]),
    (["model.num_query_groups=2", "model.activation=gelu", "model.normalization=LayerNorm"], ["parallel.tp=2"]),
    (MOE, []),
    (MOE, ["parallel.ep=2"]),
    (MOE, ["parallel.ep=4", "parallel.tp=2", "parallel.etp=1"]),
    (MOE, ["parallel.ep=2", "parallel.tp=2"]),  # etp = tp
    (MOE, ["parallel.ep=2", "parallel.pp=2", "parallel.tp=2", "parallel.etp=1"]),
    # Qwen2 (q/k/v biases, GQA) and Qwen3 (q/k norms, head_dim != hidden/heads, an MoE).
    (["model.num_query_groups=2", "model.add_qkv_bias=true"], ["parallel.tp=2"]),
    ([*MOE, "model.qk_layernorm=true", "model.kv_channels=16"], ["parallel.ep=2", "parallel.tp=2"]),
]


def built_counts(cfg, rank: int, world: int) -> tuple:
    """(dense, expert) parameters of the GPTModel chunks megatron-core builds on `rank`."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from nemo_btx.config.validate import etp_of
    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.cpu import apply_cpu_redirections

    apply_cpu_redirections()  # as init_runtime does on a machine without CUDA
    p = cfg.parallel
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vp, expert_model_parallel_size=p.ep,
            expert_tensor_parallel_size=etp_of(p), create_gloo_process_groups=False)
        chunks = build_model(cfg, shapes_only=True)  # exactly what mix, upcycle and import-hf build
        dense = expert = 0
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                assert param.device.type == "meta", name
                if ".experts." in name:
                    expert += param.numel()
                else:
                    dense += param.numel()
        return parallel_state.get_pipeline_model_parallel_rank(), dense, expert
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("model,layout", LAYOUTS, ids=lambda x: " ".join(x) or "-")
def test_rank_params_equal_megatron_core(model, layout, monkeypatch):
    # Tied embeddings under PP: megatron moves the shared weight with .cuda() before its
    # all-reduce; on this CUDA-less machine the (meta) tensor stays where it is.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    cfg = load_config([*SMALL, *model, *layout])
    world = min_world_size(cfg.parallel)
    per_stage = world // cfg.parallel.pp
    for pp_rank in range(cfg.parallel.pp):
        stage, dense, expert = built_counts(cfg, rank=pp_rank * per_stage, world=world)
        assert stage == pp_rank
        want = rank_params(cfg.model, cfg.parallel, pp_rank)
        assert (want.dense, want.expert) == (dense, expert), (layout, pp_rank)


def test_total_params_of_llama2_7b():
    cfg = load_config(["model=llama2_7b"])
    assert total_params(cfg.model) == 6_738_415_616  # Llama-2-7b-hf's published count


@pytest.mark.parametrize("preset,published", [
    ("llama31_8b", 8_030_261_248), ("mistral_7b", 7_248_023_552), ("qwen25_7b", 7_615_616_512),
    ("qwen3_8b", 8_190_735_360)])
def test_total_params_of_todays_seed_presets(preset, published):
    """conf/model presets of the seeds people start from today: their published counts."""
    assert total_params(load_config([f"model={preset}"]).model) == published


def test_total_params_equal_transformers_for_qwen2_and_qwen3():
    """The whole-model count of an imported family equals transformers' own model's (untied)."""
    import transformers

    from nemo_btx.hf.config import model_config_from_hf

    for config in (transformers.Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=8,
                                            num_key_value_heads=2, tie_word_embeddings=False),
                   transformers.Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=8, head_dim=16,
                                            num_key_value_heads=2, tie_word_embeddings=False)):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        theirs = sum(p.numel() for p in model.parameters())
        ours = model_config_from_hf(config.to_dict(), load_config([]).model, where="x", name="x")
        assert total_params(ours) == theirs, config.model_type


def test_shapes_only_model_never_touches_cuda(monkeypatch):
    """What mix, upcycle and import-hf build on a GPU node: with CUDA reported available, the
    shapes-only model is still all meta (no tensor copied to or allocated on a device), so the
    same code path runs here and there (a meta tensor cannot be copied: `model.cuda()` on it
    raised NotImplementedError on GPU nodes before)."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("a shapes-only build touched CUDA")

    cfg = load_config([*SMALL, *MOE, "parallel.ep=2", "parallel.tp=2", "parallel.etp=1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("current_device", "set_device", "device_count"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    monkeypatch.setattr(torch.nn.Module, "cuda", no_cuda)
    monkeypatch.setattr(torch.Tensor, "cuda", no_cuda)
    stage, dense, expert = built_counts(cfg, rank=0, world=min_world_size(cfg.parallel))
    want = rank_params(cfg.model, cfg.parallel, 0)
    assert (dense, expert) == (want.dense, want.expert)
