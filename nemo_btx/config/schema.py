"""Structured configuration: one dataclass per concern, the single source of truth for keys.

Hydra merges `conf/` YAML and `key=value` overrides into `ExperimentConfig`, so a key that is
not a field here, or a value of the wrong type, fails before anything runs. Fields whose value
must come from a fixed set carry `metadata={"choices": ...}`; `validate.py` checks them together
with every section's ranges, names and input paths and the cross-field rules (parallel layouts),
because OmegaConf cannot express `Literal` or bounds.

This module imports nothing heavy (no torch, no megatron), so configs load on a login node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional


#: The embedded offline corpora (nemo_btx/data/corpora.py): `data.domains.*.source=builtin`.
BUILTIN_CORPORA = ("code", "math", "wiki")


def choice(default, *choices, doc: str = ""):
    """A string field restricted to `choices` (checked in `validate.check_choices`)."""
    return field(default=default, metadata={"choices": tuple(choices), "doc": doc})


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-Experts settings; `num_experts: null` means a dense model."""

    num_experts: Optional[int] = None
    """Experts per MoE layer (BTX: number of domains, +1 when the seed joins). null = dense."""
    router_topk: int = 2
    """Experts each token is routed to (the paper's default top-2)."""
    aux_loss_coeff: float = 0.01
    """alpha of the load-balancing loss alpha*N*sum(u_i*p_i), applied in every MoE layer."""
    load_balancing_type: str = choice("aux_loss", "aux_loss", "seq_aux_loss", "sinkhorn", "none")
    """megatron-core moe_router_load_balancing_type."""
    token_dispatcher_type: str = choice("alltoall", "alltoall", "allgather")
    """How tokens reach experts on other EP ranks."""
    capacity_factor: Optional[float] = None
    """Expert capacity as a multiple of the even share (Switch: 1.5); null = no token dropping."""
    router_pre_softmax: bool = False
    """False: top-k logits then softmax over the k (the paper, and Mixtral-equivalent)."""
    grouped_gemm: bool = False
    """Use grouped GEMM experts (GPU with TE only)."""


#: ModelConfig fields that decide tensor shapes: a checkpoint must agree with its config on all
#: of them to load, and every source of a mix must share them.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "vocab_size", "activation", "normalization",
                "untie_embeddings_and_output_weights", "add_qkv_bias", "qk_layernorm")


def recorded(saved: dict, name: str):
    """ModelConfig field `name` as a saved model config (a marker's) records it; a field the
    saving version did not have yet holds its default."""
    if name in saved:
        return saved[name]
    return next(f.default for f in dataclasses.fields(ModelConfig) if f.name == name)


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder (RMSNorm, SwiGLU, RoPE) as megatron-core GPTModel builds it."""

    name: str = "tiny"
    """Label written into manifests and reports."""
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    """Width of the SwiGLU feed-forward block (each of gate and up)."""
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; null = one per attention head."""
    kv_channels: Optional[int] = None
    """Per-head dimension; null = hidden_size / num_attention_heads."""
    vocab_size: int = 4096
    """Tokenizer vocabulary; the embedding is padded up to make_vocab_size_divisible_by * tp."""
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 128
    """Training sequence length in tokens."""
    max_position_embeddings: Optional[int] = None
    """null = seq_length."""
    normalization: str = choice("RMSNorm", "RMSNorm", "LayerNorm")
    norm_epsilon: float = 1e-5
    activation: str = choice("swiglu", "swiglu", "gelu")
    """swiglu = gated SiLU as in Llama; gelu = plain GPT MLP."""
    position_embedding_type: str = choice("rope", "rope", "learned_absolute")
    rotary_base: int = 10000
    rope_scaling: Optional[str] = choice(None, None, "llama3", "linear")
    """RoPE frequency scaling: llama3 = Llama-3.1's (megatron-core's: low/high frequency factors
    1 and 4 over an original context of 8192), linear = positions divided by
    rope_scaling_factor (position interpolation); null = plain RoPE."""
    rope_scaling_factor: float = 8.0
    add_qkv_bias: bool = False
    """Biases on the query/key/value projections only (Qwen2); no other linear has one."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    family: str = choice("llama", "llama", "mistral", "qwen2", "qwen3")
    """The Hugging Face model family this model is (import-hf records it; export-hf writes that
    family's class: Llama/Mistral/Qwen2/Qwen3 dense, Mixtral or Qwen3-MoE for an MoE)."""
    untie_embeddings_and_output_weights: bool = True
    """Llama keeps the output layer separate from the input embedding."""
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    allow_local_spec: bool = False
    """On a CUDA machine without Transformer Engine: true trains with megatron-core's local layers
    (unfused attention, no grouped GEMM; slow), false (default) stops with one line instead."""
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass(kw_only=True)
class ParallelConfig:
    """How one training job is laid out over its processes (megatron-core parallel state)."""

    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size."""
    vp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); null = no interleaving."""
    cp: int = 1
    """Context parallel size."""
    ep: int = 1
    """Expert parallel size (MoE only)."""
    etp: Optional[int] = None
    """Expert tensor parallel size; null = same as tp."""
    sequence_parallel: Optional[bool] = None
    """null = on when tp > 1 and the model is MoE (megatron-core requires it there)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron DistributedOptimizer)."""
    world_size: Optional[int] = None
    """Processes the job runs with; null = take it from the launcher (WORLD_SIZE)."""
    backend: str = choice("auto", "auto", "gloo", "nccl")
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""
    batch_p2p_comm: bool = True
    """Batched pipeline send/recv. Forced off on gloo: it silently corrupts interleaved PP."""
    overlap_grad_reduce: Optional[bool] = None
    """Reduce each gradient bucket while the backward pass goes on (megatron DDP); null = on
    on GPU with the distributed optimizer (megatron-core's recommendation), off otherwise."""
    overlap_param_gather: Optional[bool] = None
    """All-gather the distributed optimizer's updated parameter shards during the next forward
    pass, bucket by bucket, instead of right after the step; needs parallel.distributed_optimizer.
    null = on on GPU with the distributed optimizer, off otherwise."""
    timeout_minutes: int = 10
    """How long a collective may wait before the job fails (torch.distributed and megatron-core's
    groups): long enough for the slowest rank's checkpoint write (the 7B presets: 60)."""
    recompute: str = choice("none", "none", "selective", "full")
    """Activation recomputation: selective recomputes the core attention (megatron-core's
    "core_attn": the s x s scores; cheap), full recomputes every layer from its input (one layer
    at a time; about a third more compute). Same losses either way; `nemo-btx plan` accounts
    for the memory it saves."""


@dataclass(kw_only=True)
class TrainConfig:
    """Optimizer, schedule and batch settings shared by every training stage."""

    seed: int = 1234
    micro_batch_size: int = 4
    """Sequences per forward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills it)."""
    train_iters: int = 20
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate (the paper: 1e-4 for Llama-2 7B)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak (the paper: 10%)."""
    warmup_iters: int = 2
    lr_decay_style: str = choice("cosine", "cosine", "linear", "constant")
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = choice("auto", "auto", "fp32", "bf16")
    """auto = bf16 on GPU, fp32 on CPU."""
    log_interval: int = 5
    async_save: Optional[bool] = None
    """Write training checkpoints in the background (megatron-core's async torch_dist save:
    tensors copied to host memory, written by a forked process, the checkpoint published when
    every rank finished) while training goes on; null = on on GPU, off on CPU."""
    optimizer_save_gather: str = choice("dp0", "dp0", "all")
    """How a training checkpoint gathers the distributed optimizer's shards to write them per
    model tensor (the format that resumes at any layout): dp0 onto data-parallel rank 0 over
    gloo (host memory: one copy of each model-parallel shard's optimizer state per node's DP
    rank 0 ranks); all onto every rank over NCCL (faster, DP times the host memory; GPU only).
    `nemo-btx plan` shows the host memory per node either way."""


@dataclass(kw_only=True)
class DomainConfig:
    """One domain of text: an expert is trained on it, and it joins the general mixture."""

    name: str = "???"
    """Directory name under <run.dir>/data/ and the expert's name (code, math, wiki, ...)."""
    source: str = "builtin"
    """builtin = the embedded offline corpus of that name; otherwise a file, directory or glob of
    .jsonl / .jsonl.gz / .jsonl.zst (one document per line, field `text_key`), .parquet (column
    `text_key`, read in record batches) or plain-text files (one document per file, .gz/.zst
    too). Ignored when `prefix` is set."""
    prefix: Optional[str] = None
    """An existing megatron-core indexed dataset to use as this domain's text (the path prefix
    of its .bin/.idx, e.g. Megatron-LM's tools/preprocess_data.py output
    `/data/math_text_document`), already tokenized with the run's tokenizer: checked (every id
    below the vocabulary) and read in place, nothing copied."""
    valid_prefix: Optional[str] = None
    """With `prefix`: the held-out documents as another indexed dataset; null = carve them out of
    `prefix` by document (the same hash rule as for text, on the document's position)."""
    text_key: str = "text"
    weight: float = 1.0
    """Share of this domain in the general mixture (normalised over domains); > 0."""
    max_documents: Optional[int] = None
    """Cap on documents read, >= 2: one to train on, one held out (null = all). A capped domain
    is read by one worker, in order."""
    expert: bool = True
    """Train an expert on this domain. false: general text that only the seed, the MoE finetune
    and the baselines read (the paper's finetune mixes all sources), with no expert, no MoE
    expert and no BTM member of its own; its perplexity is still reported."""


def expert_domains(cfg) -> List[str]:
    """The domains an expert is trained on (`data.domains.<i>.expert`), in data.domains order:
    the experts, the mix's expert sources, the BTM members, the experts Slurm array."""
    return [d.name for d in cfg.data.domains if d.expert]


@dataclass(kw_only=True)
class TokenizerConfig:
    """Train a small BPE on the domains (tiny default), or load a Hugging Face tokenizer.json."""

    kind: str = choice("bpe", "bpe", "hf")
    path: Optional[str] = None
    """For kind=hf: a tokenizer.json file or a directory holding one."""
    eod_token: Optional[str] = None
    """End-of-document token appended after every document. null = <|endoftext|> for kind=bpe;
    for kind=hf the first of <|endoftext|>, </s>, <|end_of_text|>, <eos>, <|eot_id|> the
    tokenizer knows."""
    add_bos: Optional[bool] = None
    """Begin every document (and every evaluation request) with the tokenizer's BOS token.
    null = as the tokenizer itself does: tokenizer_config.json's add_bos_token, else whether
    its post-processor adds a BOS (Llama: yes; Qwen, GPT-2 style: no); kind=bpe: never."""
    sample_chars: Optional[int] = 4_000_000
    """kind=bpe: characters of each domain's training split the BPE is trained on (the first
    ones, in the domain's order; bounded memory); null = all of it (small corpora only)."""


@dataclass(kw_only=True)
class DataConfig:
    """Per-domain indexed datasets (megatron .bin/.idx) with held-out validation splits."""

    domains: List[DomainConfig] = field(default_factory=lambda: [
        DomainConfig(name="code"), DomainConfig(name="math"), DomainConfig(name="wiki")])
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    valid_fraction: float = 0.05
    """Share of each domain's documents held out for validation, decided per document from a
    hash of its text, `data.seed` and the domain (nemo_btx/data/documents.py). A domain read as
    one stream (builtin, capped) always gets a document on each side; a large domain must."""
    max_chars_per_domain: Optional[int] = 4_000_000
    """Cap on characters read per domain (the tiny default keeps data building to seconds); the
    document that crosses it is cut. A capped domain is read by one worker, in order."""
    eval_iters: int = 4
    """Validation batches per domain at each evaluation."""
    workers: Optional[int] = None
    """Worker processes that tokenize chunks at once in one data unit; null = the CPUs this
    process may use. The output does not depend on it (chunks are fixed by `chunk_size`)."""
    chunk_size: str = "64MB"
    """Input bytes per chunk: the piece of a domain one worker tokenizes into one partial dataset
    (a .jsonl byte range, parquet row groups, a group of text files; a compressed file is one
    chunk). Bounds a worker's memory, with `buffer_size`. Changing it changes nothing in the
    final data but makes every chunk new."""
    unit_size: str = "20GB"
    """Input bytes per tokenize unit: `nemo-btx launch` runs one Slurm array task per unit and
    per domain, `run` one process; a re-run redoes only units whose inputs changed."""
    buffer_size: str = "4MB"
    """Text a worker collects before one batched encode call. A worker's memory is about 38x
    this (the batch's encodings and id lists; bench/data_throughput.py): 4MB ~ 150 MB, at 1.5 %
    less throughput than 16MB (~600 MB)."""
    dedup: str = choice("chunk", "chunk", "none")
    """chunk: drop exact repeats of a document within its chunk (16 bytes of memory per document
    of a chunk); none: keep them. Either way a repeat lands on the same side of the split."""
    skip_bad_records: bool = False
    """false: a malformed record (invalid JSON, missing text field, bad UTF-8) stops the unit with
    one line naming file and line/row; true: skip it and count it in the domain's manifest."""
    keep_parts: bool = True
    """Keep the per-chunk partial datasets after the merge, so that a changed input re-tokenizes
    only its unit (costs the dataset's size again on disk); false deletes them."""
    step: str = choice("all", "all", "tokenizer", "tokenize", "merge", "domain")
    """`nemo-btx data`: all (tokenizer, every unit with `workers` processes, every merge), or one
    unit of the plan: tokenizer; tokenize (data.unit=<domain>:<k>); merge (domain=<name>: the
    domain's tokenized pieces into its datasets); domain (domain=<name>: its pieces, then the
    merge, in one process: what `run`/`launch` use for a domain of a single unit)."""
    unit: Optional[str] = None
    """data.step=tokenize: the unit, <domain>:<k> (the units of `nemo-btx run`/`launch`)."""
    seed: int = 1234
    """Seed of the data itself: the order of the builtin code corpus, the generated math problems,
    the train/valid split and the validation batches. Separate from train.seed so that runs with
    different training seeds read the same data and are scored on the same held-out batches."""


@dataclass(kw_only=True)
class TrainStageConfig:
    """Budget and bookkeeping of one training stage; optimizer settings come from `train`."""

    lr: Optional[float] = None
    """Peak learning rate; null = train.lr."""
    warmup_iters: Optional[int] = None
    """null = train.warmup_iters."""
    eval_interval: int = 50
    """Steps between validation passes on every domain (also run at the end); >= 1."""
    save_interval: int = 50
    """Steps between resumable checkpoints (also saved at the end); >= 1."""
    keep_checkpoints: int = 2
    """Complete step checkpoints kept (>= 1); older ones are deleted after a save."""


@dataclass(kw_only=True)
class SeedConfig(TrainStageConfig):
    """Stage `seed`: pre-train the seed on the general mixture of all domains."""

    train_iters: int = 200
    """Optimizer steps of the seed (when `tokens` is null)."""
    tokens: Optional[float] = None
    """The seed's budget in tokens (steps = tokens / (train.global_batch_size x
    model.seq_length), rounded up); null = train_iters."""
    checkpoint: Optional[str] = None
    """Use this existing checkpoint (weights or training checkpoint dir) as the seed instead
    of training one, e.g. an imported Llama-2 7B. Its architecture and tokenizer must be the
    run's (checked before anything runs: nemo_btx/model/agreement.py)."""
    from_scratch: bool = False
    """A model of 1B parameters or more needs seed.checkpoint unless this is true (pretraining
    such a seed is a project of its own; the tiny default always trains its seed)."""


@dataclass(kw_only=True)
class ExpertConfig(TrainStageConfig):
    """Stage `train-expert`: continue one branched copy of the seed on its domain only."""

    train_iters: int = 100
    """Optimizer steps of each expert without a `tokens` entry."""
    tokens: Dict[str, float] = field(default_factory=dict)
    """Budgets in tokens per domain, as the paper gives them (expert.tokens.math=201e9), each
    converted to steps with the global batch and sequence length; a domain without an entry
    trains expert.train_iters steps."""


@dataclass(kw_only=True)
class JobConfig(TrainStageConfig):
    """`nemo-btx train`: a plain training run of train.train_iters steps on chosen domains."""

    out: Optional[str] = None
    """Output directory; null = <run.dir>/train."""
    init: Optional[str] = None
    """Checkpoint whose weights start the run; null = random init from train.seed."""
    domains: Optional[List[str]] = None
    """Domains to train on, weighted by data.domains.*.weight; null = all."""


@dataclass(kw_only=True)
class MixConfig:
    """Stages `mix` and `upcycle`: build one MoE checkpoint from dense checkpoints.

    Run them at the layout the MoE will train at (parallel.*): each rank reads and writes only
    its own slices. The MoE's size is derived (sources x split_experts); model.moe.num_experts
    may stay null, and the output's manifest.json records the settings the next stage needs.
    """

    experts: Optional[List[str]] = None
    """Dense expert checkpoint directories; null = <run.dir>/experts/<domain>/weights for
    every data.domains entry, in that order. Given one per domain, they are taken in
    data.domains order (router_init=data uses that)."""
    include_seed: bool = True
    """Add the seed as one more ("generalist") expert, as the paper does (the last expert)."""
    seed_checkpoint: Optional[str] = None
    """null = <run.dir>/seed/weights."""
    out: Optional[str] = None
    """null = <run.dir>/btx/mixed (mix) or <run.dir>/baselines/upcycled (upcycle). Must not
    exist, unless it is a complete output (then the stage is skipped)."""
    average_weights: Optional[List[float]] = None
    """Per-source weights for averaging the non-FFN parameters, experts first then the seed;
    normalised to sum 1; null = uniform."""
    router_init: str = choice("random", "random", "zeros", "data")
    """random (the paper), zeros (uniform routing), or data: each expert's mean hidden state
    on a few samples of its own domain (like mergekit's hidden-state gates)."""
    router_init_batches: int = 2
    """router_init=data: validation batches per domain used for the mean hidden states."""
    split_experts: int = 1
    """Cut every expert's FFN into this many chunks C (the paper's split-experts ablation):
    N*C experts of FFN size ffn_hidden_size/C, routed top-(k*C)."""
    blended: bool = False
    """The paper's blended-experts ablation: each of the N experts is made of one 1/N chunk of
    every source FFN, so no expert keeps a domain identity (see nemo_btx/mixing/experts.py)."""
    format: str = choice("megatron", "megatron", "hf", "mixtral")
    """megatron: a megatron-core MoE checkpoint. hf: a Hugging Face MoE directory at mix.out
    (required) of the experts' family (MixtralForCausalLM for Llama/Mistral experts,
    Qwen3MoeForCausalLM for Qwen3), merged straight from Hugging Face experts (mix.experts; the
    seed too if mix.include_seed), same merge rules; mixtral is its older name. Hugging Face
    experts select hf automatically (nemo_btx/hf/merge.py)."""
    threads: Optional[int] = None
    """mix.format=hf: worker threads of the merge (they read, average and write different
    pieces of the output at once); null = the CPUs this process may use, at most 8."""


@dataclass(kw_only=True)
class FinetuneConfig(TrainStageConfig):
    """Stage `finetune`: train a mixed (or upcycled) MoE on the weighted mixture of all domains.

    The architecture comes from the checkpoint; the routing is chosen here (the paper's
    variants), so one mixed checkpoint can be finetuned several ways.
    """

    train_iters: int = 300
    """Optimizer steps of the MoE stage (the tiny default: long enough for BTX to catch up
    with each expert on its own domain after the averaging of attention)."""
    tokens: Optional[float] = None
    """The MoE finetune's budget in tokens (the paper: 80e9); null = train_iters."""
    init: Optional[str] = None
    """MoE checkpoint to start from; null = <run.dir>/btx/mixed."""
    out: Optional[str] = None
    """null = <run.dir>/btx/finetuned."""
    routing: str = choice("topk", "topk", "switch", "soft", "sample_top1")
    """topk: token-choice top-k (model.moe.router_topk, top-2 by default) with softmax over the
    chosen k; switch: top-1 with capacity factor `switch_capacity_factor` (tokens over capacity
    are dropped); soft: every expert active; sample_top1: Gumbel-softmax sampling (not
    available: megatron-core's router has no sampling hook, see the README)."""
    switch_capacity_factor: float = 1.5
    """routing=switch: expert capacity as a multiple of the even share of tokens (> 0)."""
    load_balancing: bool = True
    """The load-balancing loss alpha*N*sum(u_i p_i) with alpha = model.moe.aux_loss_coeff."""
    freeze_experts: bool = False
    """Train only attention, norms, embeddings and routers (the paper's frozen-experts ablation)."""


@dataclass(kw_only=True)
class BaselinesConfig(TrainStageConfig):
    """Stage `baselines`: the paper's comparisons, trained by the same loop as BTX.

    upcycle-data: the upcycled seed finetuned for as many steps (tokens) as BTX's MoE stage;
    upcycle-compute: the upcycled seed given all the FLOPs BTX spent on its experts and its
    finetune, all in the MoE stage; dense: the seed continued on the same mixture with that
    same FLOP budget. Budgets are read from the compute ledger. Each is written to
    <run.dir>/baselines/<name> and evaluated under the same name (nemo_btx/run_dir.py)."""

    which: List[str] = field(default_factory=lambda: ["upcycle-data", "upcycle-compute", "dense"])
    """The baselines to train, each at most once (an empty list: none)."""
    upcycle: Optional[str] = None
    """The upcycled MoE checkpoint; null = <run.dir>/baselines/upcycled."""


@dataclass(kw_only=True)
class StageLayouts:
    """`nemo-btx run`: the parallel layout (a conf/parallel/*.yaml preset) each stage runs at.

    null = the experiment's own `parallel`. A layout with more than one rank runs the stage
    under torchrun with that many processes (e.g. `run.layouts.finetune=ep2`: EP=2 on 2 CPU
    processes); on a cluster, the Slurm scripts use the same presets."""

    seed: Optional[str] = None
    experts: Optional[str] = None
    mix: Optional[str] = None
    finetune: Optional[str] = None
    upcycle: Optional[str] = None
    baselines: Optional[str] = None
    """The upcycled MoE baselines (upcycle-data, upcycle-compute)."""
    dense: Optional[str] = None
    """The dense baseline (a dense model: typically the experts' layout)."""
    eval: Optional[str] = None
    """Evaluation: each model at the layout's tp/pp/ep (no EP for a dense model), its processes
    beyond one model replica data-parallel (`dp2`: 2 replicas of the whole model); null = one
    process at TP=PP=EP=1."""


@dataclass(kw_only=True)
class RunConfig:
    """Where the experiment lives: every stage reads and writes only this directory."""

    dir: str = "runs/tiny"
    layouts: StageLayouts = field(default_factory=StageLayouts)


@dataclass(kw_only=True)
class SmokeConfig:
    """The foundation's smoke stage: build a dense and an MoE model and train a few steps."""

    steps: int = 20
    """Optimizer steps per model."""
    models: List[str] = field(default_factory=lambda: ["dense", "moe"])
    """Which variants to train: dense, moe."""
    moe_num_experts: int = 4
    """Experts of the MoE variant when model.moe.num_experts is null."""


@dataclass(kw_only=True)
class EvalConfig:
    """Stage `eval`: lm-eval tasks and held-out perplexity of one model of the run directory."""

    model: str = "seed"
    """seed | expert-<domain> | btx | upcycle-data | upcycle-compute | dense | btm-top1 | btm-top2 | all (every one
    that exists), or a checkpoint directory."""
    models: Optional[List[str]] = None
    """The models `run` and `launch` evaluate (names as eval.model); null = every model of the
    experiment. The report lists the others as not evaluated by choice, not as missing."""
    tasks: List[str] = field(default_factory=lambda: ["btx_gsm8k", "btx_humaneval", "btx_mmlu"])
    """lm-eval tasks or groups: ours from eval/ (btx_*), or any of lm-eval's own by name (they read
    the hub). An empty list and no suite: perplexity only."""
    suite: Optional[str] = choice(None, None, "paper")
    """A named task suite run before `tasks` (nemo_btx/evaluation/suite.py): paper = the BTX paper's
    Table 2 (GSM8K, MATH, HumanEval, MBPP, Natural Questions, TriviaQA, ARC-Easy/Challenge, SIQA,
    PIQA, WinoGrande, MMLU at the paper's shots), which the report groups by domain."""
    limit: Optional[int] = 8
    """Documents per task (per MMLU subject); null = the full sets (real runs)."""
    perplexity: bool = True
    """Per-domain held-out perplexity on the training loop's validation batches."""
    perplexity_batches: Optional[int] = None
    """Validation batches per domain; null = data.eval_iters."""
    batch_size: int = 8
    """Sequences per forward pass when scoring (loglikelihood, perplexity)."""
    gen_batch_size: Optional[int] = None
    """Sequences generated together (greedy, over one KV cache); null = as many as half the free
    memory holds (GPU memory, else RAM), at most 64."""
    max_gen_toks: Optional[int] = 128
    """Cap on generated tokens per request, below the tasks' own (GSM8K 256, HumanEval 1024);
    the tiny default keeps CPU evaluation short. null = the tasks' values (real runs)."""
    data_dir: Optional[str] = None
    """Local benchmark data (<dir>/<benchmark>/<split>.jsonl, the README's "The paper's evaluation
    suite") when no hub is reachable; null = $NEMO_BTX_EVAL_DATA or the shared/data directory
    beside the repository."""
    missing_data: str = choice("skip", "skip", "error")
    """A task whose documents are not on this machine (GSM8K with no hub and no local copy):
    skip: evaluate the others and record why (results.json, the report); error: stop before
    anything runs (`nemo-btx run` checks first). The 7B preset says error."""
    btm_prior: str = choice("uniform", "uniform", "estimate")
    """BTM prior over experts: uniform, or estimated as the mean posterior on validation data."""
    btm_routing: str = choice("posterior", "posterior", "tfidf")
    """BTM expert weights: Bayes posterior given the context, or tf-idf similarity of the context
    to each domain's training data."""


@dataclass(kw_only=True)
class ClusterConfig:
    """`nemo-btx launch`: the Slurm cluster the experiment runs on, one job per stage.

    The experts, the baselines and the evaluated models are array jobs (one task each); the
    jobs are chained with `--dependency=afterok`. Every job runs the same stage command as
    `nemo-btx run`, at the stage's layout (run.layouts.<stage>), so a re-submitted job resumes
    from its last complete checkpoint and skips what is complete."""

    partition: Optional[str] = None
    """Partition of the GPU jobs; null = the cluster's default partition."""
    cpu_partition: Optional[str] = None
    """Partition of the jobs that need no GPU (data, branch, report); null = `partition`."""
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = 0
    """GPUs per node. 0 = a CPU cluster (no GPU request): each job runs its layout's processes
    on one node, under torchrun --standalone when there are more than one."""
    nodes: int = 1
    """Nodes of each GPU training job whose layout leaves parallel.world_size null: its world
    size is nodes x gpus_per_node (data parallel grows with it). A layout that sets
    parallel.world_size gets world_size / gpus_per_node nodes (per-stage sizes: run.layouts).
    On a CPU cluster (gpus_per_node=0): every job of more than one process spreads its
    processes evenly over this many nodes (srun, one torchrun per node, gloo across hosts)."""
    data_cpus: Optional[int] = None
    """CPUs of each data job (tokenizer, tokenize units, merges), whose worker processes tokenize
    one chunk per core; null = cpus_per_process x gpus_per_node (a node's worth), or
    cpus_per_process on a CPU cluster."""
    cpus_per_process: int = 1
    """CPU cores per process (per GPU on a GPU cluster); a node's task asks for this times the
    processes it runs. Also the jobs' OMP_NUM_THREADS."""
    mem: Optional[str] = None
    """--mem per node, e.g. 0 (all of it) or 500G; null = the cluster's default."""
    time: str = "04:00:00"
    """Time limit of the training jobs: seed, experts, mix, finetune, upcycle, baselines
    (Slurm format: [days-]hours:minutes:seconds). With `requeue` a job that reaches it saves a
    checkpoint, requeues itself and goes on, so it may be shorter than a stage."""
    eval_time: Optional[str] = None
    """Time limit of each eval task; null = `time`."""
    cpu_time: Optional[str] = None
    """Time limit of the data, branch and report jobs; null = `time`."""
    exclusive: bool = False
    """Ask for whole nodes (--exclusive) for the GPU jobs."""
    python: Optional[str] = None
    """Interpreter that runs nemo_btx in a job; null = the one running `nemo-btx launch` (its
    venv), or `python` inside `container_image`."""
    container_image: Optional[str] = None
    """Run each job's processes in this container (pyxis/enroot: srun --container-image)."""
    container_mounts: List[str] = field(default_factory=list)
    """srun --container-mounts entries (SRC:DST), e.g. the file system holding run.dir."""
    setup: List[str] = field(default_factory=list)
    """Shell lines every job runs before its stage (module load ..., source venv/bin/activate)."""
    env: List[str] = field(default_factory=list)
    """Environment of every job as NAME=value, e.g. ['NCCL_DEBUG=WARN', 'NCCL_IB_TIMEOUT=22']."""
    workdir: Optional[str] = None
    """Directory the jobs run in (a relative run.dir is read from there); null = the directory
    `nemo-btx launch` runs in."""
    rdzv_port: int = 29500
    """torchrun rendezvous port on a job's first node (plus the job id modulo 1000)."""
    requeue: bool = True
    """--requeue: a preempted job, or one stopped before its time limit, is queued again and
    resumes from its last checkpoint."""
    signal_seconds: int = 120
    """The job script gets USR1 this many seconds before the time limit and asks the training
    stage to save a checkpoint and stop; the job then requeues itself. 0 = no signal."""
    array_parallelism: Optional[int] = None
    """At most this many tasks of an array job run at once (--array=...%N); null = no cap."""
    job_prefix: str = "btx"
    """Job names are <job_prefix>-<stage>."""
    sbatch_args: List[str] = field(default_factory=list)
    """Extra sbatch options for every job, e.g. [--reservation=btx, --constraint=h100]."""
    dry_run: bool = False
    """Only render the scripts into <run.dir>/slurm/; submit nothing."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU (H100 SXM: 80). `validate`, `run` and `launch` refuse a stage whose
    layout `nemo-btx plan` predicts above it (plan.check=false to run it anyway)."""
    gpu_peak_tflops: float = 989.0
    """Dense bf16 peak of one GPU in TFLOP/s (H100 SXM: 989), for the plan's step times."""
    only: Optional[List[str]] = None
    """Submit only these stages or units (STAGE or STAGE:ITEM, e.g. [tokenizer, tokenize, data] to
    build the data first, or [experts:math]); what is complete is skipped as always. null = the
    whole chain."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Where training metrics go besides metrics.jsonl and TensorBoard (always written)."""

    wandb: bool = False
    """Also log every step to Weights & Biases (the `wandb` extra; WANDB_MODE=offline writes the
    run to <stage dir>/wandb without a server). A resumed stage continues its W&B run."""
    wandb_project: str = "nemo-btx"
    wandb_entity: Optional[str] = None


@dataclass(kw_only=True)
class PlanConfig:
    """`nemo-btx plan`'s assumptions (nemo_btx/planner/)."""

    mfu: float = 0.4
    """Model FLOP utilisation assumed for step times and GPU-days (useful FLOPs / peak)."""
    overhead_gb: float = 4.0
    """Per-GPU memory the planner adds for what it does not itemise: the CUDA context, NCCL
    buffers, the allocator's fragmentation, temporary buffers of the optimizer step."""
    check: bool = True
    """Refuse a GPU layout predicted over cluster.gpu_memory_gb before anything runs."""


@dataclass(kw_only=True)
class HFConfig:
    """`nemo-btx import-hf` / `export-hf`: Hugging Face Llama and Mixtral checkpoints in and out."""

    path: Optional[str] = None
    """import-hf: the Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    export-hf: a checkpoint directory to export instead of the run's `hf.model`."""
    out: Optional[str] = None
    """import-hf: the megatron-core checkpoint to write; null = <run.dir>/imported (point
    seed.checkpoint at it). export-hf: the Hugging Face directory; null = <run.dir>/hf/<model>."""
    model: str = "btx"
    """export-hf: the run's model to export: seed | expert-<domain> | btx | upcycle-data |
    upcycle-compute | dense (a dense one becomes LlamaForCausalLM, an MoE MixtralForCausalLM)."""
    dtype: str = choice("auto", "auto", "float32", "bfloat16", "float16")
    """dtype of the written tensors (export-hf, and the Hugging Face merge); auto = as stored
    in the input (the merge: the first expert)."""
    max_shard_size: str = "5GB"
    """export-hf and the Hugging Face merge (mix.format=hf): largest safetensors shard, in
    bytes or with a unit (KB, MB, GB; powers of 1000)."""


@dataclass(kw_only=True)
class ExperimentConfig:
    """The root config: one experiment = one run directory."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    job: JobConfig = field(default_factory=JobConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    domain: Optional[str] = None
    """train-expert: the domain to train (a data.domains name)."""
    domain_index: Optional[int] = None
    """train-expert: the domain by position in data.domains (what a Slurm array task has)."""
    smoke: SmokeConfig = field(default_factory=SmokeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hf: HFConfig = field(default_factory=HFConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
