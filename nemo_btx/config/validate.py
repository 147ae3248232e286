"""Checks that run before any process group, model or file is created.

Every failure is one `ConfigError` naming the dotted key, the value and what is allowed: a
layout that megatron-core would reject with an assert deep inside `initialize_model_parallel`
(or, worse, accept and compute something else) is caught here, on a login node, in milliseconds.

One small function per config section. `check_config` runs those that need nothing but the
config (ranges, choices, names, paths the user gave); `validate` adds the layout rules, which
need the world size and the model a stage really builds (finetune takes it from its input
checkpoint, so the CLI runs `check_config` first and `validate` once the model is known).

Paths: a path the user gives as an input (seed.checkpoint, job.init, hf.path, a domain source,
the tokenizer, eval.data_dir) must exist now. An input that an earlier stage of the same run
writes (mix.experts, mix.seed_checkpoint, finetune.init, baselines.upcycle) is checked only when
it lies outside run.dir and is not mix.out: `nemo-btx run` validates before those stages ran.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from nemo_btx.config.schema import ExperimentConfig, ParallelConfig, TrainStageConfig
from nemo_btx.errors import ConfigError

#: A domain name is a directory name under <run.dir>/data/ (as data.corpora requires).
_DIR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Slurm --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
_TIME = re.compile(r"^((\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE)$")
#: One shell word Slurm takes as an option value (partition, account, qos, job names).
_WORD = re.compile(r"^[A-Za-z0-9_.,:@%+/=-]+$")
#: Slurm --mem: a number with an optional unit K, M, G or T (0 = all of the node's memory).
_MEM = re.compile(r"^\d+[KMGTkmgt]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SMOKE_MODELS = ("dense", "moe")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _walk(obj, prefix: str = "") -> Iterator[Tuple[str, object, dict]]:
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from _walk(value, key + ".")
        else:
            yield key, value, f.metadata


def check_choices(cfg) -> None:
    """Every field declared with `choice(...)` holds one of its allowed strings."""
    for key, value, meta in _walk(cfg):
        allowed = meta.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(key, value, "must be one of "
                              + ", ".join("null" if a is None else a for a in allowed))


def _positive(key: str, value, minimum: int = 1, null: bool = False) -> None:
    """An integer >= minimum; None passes (the schema only lets Optional fields be null, and
    `null` says so in the message)."""
    if value is not None and value < minimum:
        raise ConfigError(key, value, f"must be an integer >= {minimum}{', or null' if null else ''}")


def _above_zero(key: str, value, null: bool = False) -> None:
    """A finite number > 0 (NaN and inf fail too); None passes as in `_positive`."""
    if value is not None and (not value > 0 or not math.isfinite(value)):
        raise ConfigError(key, value, f"must be a finite number > 0{', or null' if null else ''}")


def _unique(key: str, values: Sequence) -> None:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            raise ConfigError(f"{key}.{i}", v, f"appears twice in {key}")
        seen.add(v)


def _existing_dir(key: str, value: Optional[str], allowed: str = "no such directory") -> None:
    if value is None:
        return
    if not str(value).strip() or not Path(value).expanduser().is_dir():
        raise ConfigError(key, value, allowed)


def _written_by_this_run(cfg: ExperimentConfig, value: str) -> bool:
    """Inside run.dir, or mix.out: an earlier stage of this run may still be about to write it."""
    path = Path(value).expanduser().resolve()
    roots = [Path(cfg.run.dir).expanduser().resolve()]
    if cfg.mix.out:
        roots.append(Path(cfg.mix.out).expanduser().resolve())
    return any(path == r or r in path.parents for r in roots)


def _stage_input(cfg: ExperimentConfig, key: str, value: Optional[str]) -> None:
    """A checkpoint an earlier stage produces by default: checked when it cannot be that."""
    if value is not None and (not str(value).strip() or not _written_by_this_run(cfg, value)):
        _existing_dir(key, value, "no such directory (an input outside run.dir must exist "
                      "before the run starts; null = this run's own)")


def _has_files(pattern: str) -> bool:
    """A file, a directory holding a file, or a glob matching a file (stops at the first)."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return True
    if path.is_dir():
        return any(p.is_file() and not p.name.startswith(".") for p in path.rglob("*"))
    if glob.has_magic(pattern):
        return any(os.path.isfile(p) for p in glob.iglob(str(path), recursive=True))
    return False


def etp_of(p: ParallelConfig) -> int:
    """Expert tensor parallel size actually used (megatron-core defaults it to tp)."""
    return p.tp if p.etp is None else p.etp


def min_world_size(p: ParallelConfig) -> int:
    """Smallest process count the layout fits: both the dense and the expert grid must tile it."""
    return math.lcm(p.tp * p.pp * p.cp, etp_of(p) * p.ep * p.pp)


def resolve_world_size(p: ParallelConfig, env: Optional[dict] = None) -> int:
    """parallel.world_size, else the launcher's WORLD_SIZE, else the smallest layout that fits."""
    env = os.environ if env is None else env
    launched = env.get("WORLD_SIZE")
    if p.world_size is not None and launched is not None and int(launched) != p.world_size:
        raise ConfigError(
            "parallel.world_size", p.world_size,
            f"the launcher started {launched} processes (WORLD_SIZE); set them equal or leave it null",
        )
    if p.world_size is not None:
        return p.world_size
    if launched is not None:
        return int(launched)
    return min_world_size(p)


def sequence_parallel_of(cfg: ExperimentConfig) -> bool:
    """Sequence parallel actually used: explicit setting, else on for MoE with TP > 1."""
    p = cfg.parallel
    if p.sequence_parallel is not None:
        return bool(p.sequence_parallel) and p.tp > 1
    return p.tp > 1 and cfg.model.moe.num_experts is not None


def check_model(cfg: ExperimentConfig) -> None:
    m = cfg.model
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.num_query_groups", m.num_query_groups)
    _positive("model.kv_channels", m.kv_channels)
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", m.hidden_size,
                          f"must be a multiple of model.num_attention_heads={m.num_attention_heads} "
                          "(or set model.kv_channels)")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        raise ConfigError("model.num_query_groups", m.num_query_groups,
                          f"must divide model.num_attention_heads={m.num_attention_heads} "
                          f"(allowed: {_divisors(m.num_attention_heads)})")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise ConfigError("model.max_position_embeddings", m.max_position_embeddings,
                          f"must be >= model.seq_length={m.seq_length}")
    moe = m.moe
    if moe.num_experts is not None:
        _positive("model.moe.num_experts", moe.num_experts)
        if not 1 <= moe.router_topk <= moe.num_experts:
            raise ConfigError("model.moe.router_topk", moe.router_topk,
                              f"must be between 1 and model.moe.num_experts={moe.num_experts}")
        if moe.router_topk == 1 and not moe.router_pre_softmax:
            raise ConfigError("model.moe.router_pre_softmax", moe.router_pre_softmax,
                              "top-1 routing needs softmax before top-k (true): a softmax over one "
                              "chosen logit is always 1 and gives the router no gradient")
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            raise ConfigError("model.moe.capacity_factor", moe.capacity_factor,
                              "must be > 0, or null for no token dropping")
    if not moe.aux_loss_coeff >= 0:
        raise ConfigError("model.moe.aux_loss_coeff", moe.aux_loss_coeff, "must be >= 0")
    _above_zero("model.norm_epsilon", m.norm_epsilon)
    _above_zero("model.init_method_std", m.init_method_std)
    _positive("model.rotary_base", m.rotary_base)
    for name in ("attention_dropout", "hidden_dropout"):
        if not 0 <= getattr(m, name) < 1:
            raise ConfigError(f"model.{name}", getattr(m, name), "must be >= 0 and < 1")


def check_parallel_sizes(cfg: ExperimentConfig) -> None:
    """Every parallel size is a positive integer (the rules between them: `check_parallel`)."""
    p = cfg.parallel
    for name in ("tp", "pp", "cp", "ep"):
        _positive(f"parallel.{name}", getattr(p, name))
    for name in ("vp", "etp", "world_size"):
        _positive(f"parallel.{name}", getattr(p, name), null=True)


def check_parallel(cfg: ExperimentConfig, world_size: int) -> None:
    """The layout rules megatron-core's parallel state and layers rely on."""
    m, p = cfg.model, cfg.parallel
    check_parallel_sizes(cfg)
    _positive("parallel.world_size", world_size)
    etp = etp_of(p)
    groups = m.num_query_groups or m.num_attention_heads

    if m.num_attention_heads % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"must divide model.num_attention_heads={m.num_attention_heads} "
                          f"(allowed: {_divisors(m.num_attention_heads)})")
    if groups % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"must divide the query groups (model.num_query_groups={groups}; "
                          f"allowed: {_divisors(groups)})")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.num_layers % p.pp:
        raise ConfigError("parallel.pp", p.pp,
                          f"must divide model.num_layers={m.num_layers} "
                          f"(allowed: {_divisors(m.num_layers)})")
    if p.vp is not None and p.vp > 1:
        if p.pp == 1:
            raise ConfigError("parallel.vp", p.vp,
                              "virtual pipeline stages need parallel.pp > 1 (or set parallel.vp=null)")
        if m.num_layers % (p.pp * p.vp):
            raise ConfigError("parallel.vp", p.vp,
                              f"parallel.pp*parallel.vp must divide model.num_layers={m.num_layers} "
                              f"(pp={p.pp}; allowed vp: "
                              f"{_divisors(m.num_layers // p.pp)})")
    if p.cp > 1 and m.seq_length % (2 * p.cp):
        raise ConfigError("parallel.cp", p.cp,
                          f"2*parallel.cp must divide model.seq_length={m.seq_length}")
    if world_size % (p.tp * p.pp * p.cp):
        raise ConfigError("parallel.world_size", world_size,
                          f"must be a multiple of tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {p.tp * p.pp * p.cp}")

    moe = m.moe.num_experts
    if moe is None:
        if p.ep > 1:
            raise ConfigError("parallel.ep", p.ep,
                              "expert parallelism needs an MoE model (set model.moe.num_experts)")
        if p.etp is not None and p.etp != p.tp:
            raise ConfigError("parallel.etp", p.etp,
                              "expert tensor parallelism needs an MoE model (set model.moe.num_experts)")
    else:
        if moe % p.ep:
            raise ConfigError("parallel.ep", p.ep,
                              f"must divide model.moe.num_experts={moe} (allowed: {_divisors(moe)})")
        if m.ffn_hidden_size % etp:
            raise ConfigError("parallel.etp", etp,
                              f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
        dense_grid = world_size // p.pp  # ranks per pipeline stage: tp * cp * dp
        if dense_grid % (etp * p.ep):
            raise ConfigError("parallel.ep", p.ep,
                              f"expert grid etp*ep = {etp}*{p.ep} = {etp * p.ep} must divide the "
                              f"ranks of one pipeline stage, world_size/pp = {world_size}/{p.pp} "
                              f"= {dense_grid}")
        if p.tp > 1 and p.sequence_parallel is False:
            raise ConfigError("parallel.sequence_parallel", False,
                              "megatron-core MoE with parallel.tp > 1 requires sequence parallel "
                              "(set it to true or null)")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather", True,
                          "gathers the distributed optimizer's parameter shards: needs "
                          "parallel.distributed_optimizer=true (or set it to false or null)")
    if sequence_parallel_of(cfg) and m.seq_length % p.tp:
        raise ConfigError("model.seq_length", m.seq_length,
                          f"sequence parallel splits the sequence over parallel.tp={p.tp}: "
                          "must be a multiple of it")



def check_train(cfg: ExperimentConfig) -> None:
    """Optimizer and schedule values (the batch against the layout: `check_batch`)."""
    t = cfg.train
    for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.warmup_iters", t.warmup_iters, minimum=0)
    if t.warmup_iters >= t.train_iters:
        raise ConfigError("train.warmup_iters", t.warmup_iters,
                          f"must be smaller than train.train_iters={t.train_iters}")
    _above_zero("train.lr", t.lr)
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("train.min_lr_ratio", t.min_lr_ratio, "must be between 0 and 1")
    if not t.clip_grad >= 0:
        raise ConfigError("train.clip_grad", t.clip_grad, "must be >= 0 (0 disables clipping)")
    if not t.weight_decay >= 0:
        raise ConfigError("train.weight_decay", t.weight_decay, "must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"train.{name}", getattr(t, name), "must be >= 0 and < 1")
    _above_zero("train.adam_eps", t.adam_eps)


def check_batch(cfg: ExperimentConfig, world_size: int) -> None:
    """The global batch splits into micro-batches over the data-parallel ranks."""
    t, p = cfg.train, cfg.parallel
    dp = world_size // (p.tp * p.pp * p.cp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"must be a multiple of train.micro_batch_size*dp = "
                          f"{t.micro_batch_size}*{dp} = {per_step}")
    num_micro = t.global_batch_size // per_step
    if p.vp is not None and p.vp > 1 and num_micro % p.pp:
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"the interleaved pipeline needs the number of micro-batches "
                          f"({num_micro}) to be a multiple of parallel.pp={p.pp}")


def check_run(cfg: ExperimentConfig) -> None:
    """run.dir is a directory path; every run.layouts.<stage> names a conf/parallel preset."""
    from nemo_btx.config.load import group_options

    if not cfg.run.dir or not str(cfg.run.dir).strip():
        raise ConfigError("run.dir", cfg.run.dir, "must be a directory path")
    if Path(cfg.run.dir).expanduser().is_file():
        raise ConfigError("run.dir", cfg.run.dir, "is a file; the run directory must be a directory")
    options = None
    for f in fields(cfg.run.layouts):
        layout = getattr(cfg.run.layouts, f.name)
        if layout is None:
            continue
        options = options or group_options("parallel")
        if layout not in options:
            raise ConfigError(f"run.layouts.{f.name}", layout,
                              f"no conf/parallel/{layout}.yaml; available: {', '.join(options)}, or null")


def check_data(cfg: ExperimentConfig) -> None:
    """Domains (names, weights, caps, sources that exist), the split and the tokenizer."""
    from nemo_btx.config.schema import BUILTIN_CORPORA as BUILTIN

    d = cfg.data
    if not d.domains:
        raise ConfigError("data.domains", [], "at least one domain is needed")
    if not any(dom.expert for dom in d.domains):
        raise ConfigError("data.domains", [dom.name for dom in d.domains],
                          "no domain has expert: true; BTX needs at least one expert")
    names = set()
    for i, dom in enumerate(d.domains):
        key = f"data.domains.{i}"
        if not _DIR_NAME.match(dom.name or ""):
            raise ConfigError(f"{key}.name", dom.name, "must be a directory name: letters, digits, "
                              "'_', '-', '.', not starting with '.'")
        if dom.name in names:
            raise ConfigError(f"{key}.name", dom.name, "domain names must be unique")
        names.add(dom.name)
        _above_zero(f"{key}.weight", dom.weight)
        if dom.max_documents is not None and dom.max_documents < 2:
            raise ConfigError(f"{key}.max_documents", dom.max_documents,
                              "must be >= 2 (one document to train on, one held out), or null")
        if dom.valid_prefix is not None and dom.prefix is None:
            raise ConfigError(f"{key}.valid_prefix", dom.valid_prefix, "needs data.domains.<i>.prefix "
                              "(the held-out documents of an existing dataset)")
        if dom.prefix is not None:
            for pkey, prefix in ((f"{key}.prefix", dom.prefix), (f"{key}.valid_prefix", dom.valid_prefix)):
                if prefix is not None and not all(Path(f"{prefix}.{ext}").is_file() for ext in ("bin", "idx")):
                    raise ConfigError(pkey, prefix, "must be the path prefix of a megatron indexed dataset: "
                                      f"{prefix}.bin and {prefix}.idx must exist")
            continue
        if dom.source == "builtin":
            if dom.name == "math" and d.max_chars_per_domain is None and dom.max_documents is None:
                raise ConfigError("data.max_chars_per_domain", None, "the builtin math corpus is generated "
                                  f"without end: give a cap (or {key}.max_documents)")
            if dom.name not in BUILTIN:
                raise ConfigError(f"{key}.source", dom.source,
                                  f"there is no builtin corpus named '{dom.name}' (builtin: "
                                  f"{', '.join(BUILTIN)}); give a path or glob of .jsonl or text files")
            continue
        if not dom.source or not dom.source.strip() or not _has_files(dom.source):
            raise ConfigError(f"{key}.source", dom.source, "'builtin', or an existing file, a "
                              "directory holding files, or a glob matching files")
        if not dom.text_key:
            raise ConfigError(f"{key}.text_key", dom.text_key, "must name the JSON field holding the text")
    if not 0 < d.valid_fraction < 1:
        raise ConfigError("data.valid_fraction", d.valid_fraction, "must be between 0 and 1 (exclusive)")
    _positive("data.max_chars_per_domain", d.max_chars_per_domain, null=True)
    _positive("data.eval_iters", d.eval_iters)
    _positive("data.workers", d.workers, null=True)
    from nemo_btx.config.sizes import parse_size

    for key in ("chunk_size", "unit_size", "buffer_size"):
        value = getattr(d, key)
        try:
            ok = parse_size(value) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"data.{key}", value, "must be a size: bytes, or with a unit (KB, MB, GB; "
                              "powers of 1000), e.g. 64MB")
    if d.unit is not None and d.step != "tokenize":
        raise ConfigError("data.unit", d.unit, "only data.step=tokenize takes a unit")
    _positive("data.tokenizer.sample_chars", d.tokenizer.sample_chars, null=True)
    tok = d.tokenizer
    # kind=hf without a path takes the seed's tokenizer (data/tokenizer.py finds it,
    # model/agreement.py checks it).
    if tok.kind == "hf" and (tok.path or not cfg.seed.checkpoint):
        if not tok.path:
            raise ConfigError("data.tokenizer.path", tok.path, "data.tokenizer.kind=hf needs the "
                              "path of a tokenizer.json file or of a directory holding one (or "
                              "seed.checkpoint: its tokenizer)")
        path = Path(tok.path).expanduser()
        if not (path.is_file() or (path / "tokenizer.json").is_file()):
            raise ConfigError("data.tokenizer.path", tok.path,
                              "no such file, nor a directory holding tokenizer.json")
    if tok.eod_token is not None and not tok.eod_token:
        raise ConfigError("data.tokenizer.eod_token", tok.eod_token, "must be a token, or null")


def check_domain(cfg: ExperimentConfig) -> None:
    """train-expert's domain / domain_index, when given, name an expert domain (and agree);
    domain_index counts the expert domains (the experts array's task id)."""
    from nemo_btx.config.schema import expert_domains

    names = expert_domains(cfg)
    if cfg.domain is not None and cfg.domain not in names:
        raise ConfigError("domain", cfg.domain, f"must be one of {', '.join(names)}")
    if cfg.domain_index is not None:
        if not 0 <= cfg.domain_index < len(names):
            raise ConfigError("domain_index", cfg.domain_index,
                              f"must be between 0 and {len(names) - 1} ({', '.join(names)})")
        if cfg.domain is not None and names[cfg.domain_index] != cfg.domain:
            raise ConfigError("domain_index", cfg.domain_index,
                              f"names {names[cfg.domain_index]!r}, not domain={cfg.domain!r}; "
                              "give one of them")


def check_stage(key: str, stage: TrainStageConfig) -> None:
    """One training stage's budget and bookkeeping (seed, expert, job, finetune, baselines)."""
    if hasattr(stage, "train_iters"):
        _positive(f"{key}.train_iters", stage.train_iters)
    _positive(f"{key}.eval_interval", stage.eval_interval)
    _positive(f"{key}.save_interval", stage.save_interval)
    _positive(f"{key}.keep_checkpoints", stage.keep_checkpoints)
    _above_zero(f"{key}.lr", stage.lr, null=True)
    _positive(f"{key}.warmup_iters", stage.warmup_iters, minimum=0, null=True)


def check_stages(cfg: ExperimentConfig) -> None:
    """Every training stage's budget, and the checkpoints they start from."""
    for key in ("seed", "expert", "job", "finetune", "baselines"):
        check_stage(key, getattr(cfg, key))
    _above_zero("seed.tokens", cfg.seed.tokens, null=True)
    _above_zero("finetune.tokens", cfg.finetune.tokens, null=True)
    from nemo_btx.config.schema import expert_domains

    names = expert_domains(cfg)
    for domain, tokens in cfg.expert.tokens.items():
        if domain not in names:
            raise ConfigError(f"expert.tokens.{domain}", tokens,
                              f"not an expert domain; the experts are {', '.join(names)}")
        _above_zero(f"expert.tokens.{domain}", tokens)
    _existing_dir("seed.checkpoint", cfg.seed.checkpoint,
                  "no such directory (an existing checkpoint to adopt as the seed, or null)")
    _existing_dir("job.init", cfg.job.init, "no such directory (a checkpoint, or null)")
    if cfg.job.domains is not None:
        names = [d.name for d in cfg.data.domains]
        if not cfg.job.domains:
            raise ConfigError("job.domains", [], f"at least one of {', '.join(names)}, or null for all")
        for i, name in enumerate(cfg.job.domains):
            if name not in names:
                raise ConfigError(f"job.domains.{i}", name, f"must be one of {', '.join(names)}")
        _unique("job.domains", cfg.job.domains)


def check_mix(cfg: ExperimentConfig) -> None:
    """The mix's inputs exist and its counts are positive. The merge rules themselves (sources,
    expert table, weights, router init) are checked once, by the merge recipe
    (nemo_btx/mixing/recipe.py), which the mix stages and `run`/`launch` build before anything
    runs (cli.py)."""
    mix = cfg.mix
    if mix.experts is not None:
        if not mix.experts:
            raise ConfigError("mix.experts", [], "at least one checkpoint, or null for the run's experts")
        for i, path in enumerate(mix.experts):
            _stage_input(cfg, f"mix.experts.{i}", path)
    _stage_input(cfg, "mix.seed_checkpoint", mix.seed_checkpoint)
    _positive("mix.router_init_batches", mix.router_init_batches)
    _positive("mix.split_experts", mix.split_experts)
    _positive("mix.threads", mix.threads, null=True)


def check_finetune(cfg: ExperimentConfig) -> None:
    """The routing variant and the MoE checkpoint it starts from."""
    f = cfg.finetune
    if f.routing == "sample_top1":
        raise ConfigError("finetune.routing", f.routing,
                          "not available: megatron-core 0.16's TopKRouter has no sampling hook "
                          "(choose topk, switch or soft)")
    _above_zero("finetune.switch_capacity_factor", f.switch_capacity_factor)
    _stage_input(cfg, "finetune.init", f.init)


def check_baselines(cfg: ExperimentConfig) -> None:
    from nemo_btx.run_dir import BASELINE_NAMES

    for i, name in enumerate(cfg.baselines.which):
        if name not in BASELINE_NAMES:
            raise ConfigError(f"baselines.which.{i}", name, f"must be one of {', '.join(BASELINE_NAMES)}")
    _unique("baselines.which", cfg.baselines.which)
    _stage_input(cfg, "baselines.upcycle", cfg.baselines.upcycle)


def model_names(cfg: ExperimentConfig) -> List[str]:
    """The names of the run's models (eval.model, hf.model): seed, experts, baselines, btx."""
    from nemo_btx.run_dir import BASELINE_NAMES

    from nemo_btx.config.schema import expert_domains

    return ["seed", *[f"expert-{d}" for d in expert_domains(cfg)], *BASELINE_NAMES, "btx"]


def check_eval(cfg: ExperimentConfig) -> None:
    """Sizes, task names, and a model that is the run's or an existing checkpoint directory."""
    from nemo_btx.run_dir import BTM_MODELS

    e = cfg.eval
    _positive("eval.batch_size", e.batch_size)
    _positive("eval.gen_batch_size", e.gen_batch_size, null=True)
    _positive("eval.limit", e.limit, null=True)
    _positive("eval.max_gen_toks", e.max_gen_toks, null=True)
    _positive("eval.perplexity_batches", e.perplexity_batches, null=True)
    for i, task in enumerate(e.tasks):
        if not isinstance(task, str) or not task.strip():
            raise ConfigError(f"eval.tasks.{i}", task, "must be an lm-eval task or group name")
    _unique("eval.tasks", e.tasks)
    names = [*model_names(cfg), *BTM_MODELS, "all"]
    if e.model not in names:
        _existing_dir("eval.model", e.model, f"one of {', '.join(names)}, or a checkpoint directory")
    if e.models is not None:
        known = [n for n in names if n != "all"]
        for i, name in enumerate(e.models):
            if name not in known:
                raise ConfigError(f"eval.models.{i}", name, f"one of {', '.join(known)}")
        _unique("eval.models", e.models)
    _existing_dir("eval.data_dir", e.data_dir, "no such directory (local benchmark data, or null)")


def check_cluster(cfg: ExperimentConfig) -> None:
    """Every cluster.* value `nemo-btx launch` writes into sbatch scripts."""
    c = cfg.cluster
    if c.gpus_per_node < 0:
        raise ConfigError("cluster.gpus_per_node", c.gpus_per_node, "must be >= 0 (0 = a CPU cluster)")
    _positive("cluster.nodes", c.nodes)
    _positive("cluster.data_cpus", c.data_cpus, null=True)
    for key in ("time", "eval_time", "cpu_time"):
        value = getattr(c, key)
        if value is not None and not _TIME.match(str(value)):
            raise ConfigError(f"cluster.{key}", value, "must be a Slurm time: minutes, "
                              "hours:minutes:seconds or days-hours[:minutes[:seconds]] "
                              "(e.g. 04:00:00, 2-00:00:00)")
    _positive("cluster.cpus_per_process", c.cpus_per_process)
    if c.signal_seconds < 0:
        raise ConfigError("cluster.signal_seconds", c.signal_seconds, "must be >= 0 (0 = no signal)")
    if not 1024 <= c.rdzv_port <= 64535:
        raise ConfigError("cluster.rdzv_port", c.rdzv_port, "must be between 1024 and 64535")
    _positive("cluster.array_parallelism", c.array_parallelism, null=True)
    for key in ("partition", "cpu_partition", "account", "qos", "job_prefix"):
        value = getattr(c, key)
        if value is not None and not _WORD.match(str(value)):
            raise ConfigError(f"cluster.{key}", value, "must be one word (letters, digits and _.,:@%+/=-)")
    if c.mem is not None and not _MEM.match(str(c.mem)):
        raise ConfigError("cluster.mem", c.mem, "must be a Slurm memory size: a number with an "
                          "optional unit K, M, G or T (e.g. 500G; 0 = all of the node's memory)")
    for i, item in enumerate(c.env):
        name, eq, _ = str(item).partition("=")
        if not eq or not _ENV_NAME.match(name):
            raise ConfigError(f"cluster.env.{i}", item, "must be NAME=value with NAME an environment "
                              "variable name")
    for i, arg in enumerate(c.sbatch_args):
        if not str(arg).startswith("-"):
            raise ConfigError(f"cluster.sbatch_args.{i}", arg, "must be an sbatch option (--name=value)")
    for i, mount in enumerate(c.container_mounts):
        if not str(mount).strip() or any(not part for part in str(mount).split(":")[:2]):
            raise ConfigError(f"cluster.container_mounts.{i}", mount, "must be SRC[:DST[:FLAGS]]")
    for key in ("python", "container_image", "workdir"):
        value = getattr(c, key)
        if value is not None and not str(value).strip():
            raise ConfigError(f"cluster.{key}", value, "must not be empty (null = the default)")


def check_hf(cfg: ExperimentConfig) -> None:
    """import-hf/export-hf: the input directory exists, the model is the run's, shards parse."""
    from nemo_btx.config.sizes import parse_size

    h = cfg.hf
    _existing_dir("hf.path", h.path, "no such directory (a Hugging Face model for import-hf, a "
                  "checkpoint for export-hf, or null)")
    names = model_names(cfg)
    if h.path is None and h.model not in names:
        raise ConfigError("hf.model", h.model, f"one of {', '.join(names)} (or set hf.path to a "
                          "checkpoint directory)")
    try:
        size = parse_size(h.max_shard_size)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError("hf.max_shard_size", h.max_shard_size,
                          "must be a size of at least one byte: bytes, or a number with KB, MB, GB, "
                          "TB, KiB, MiB or GiB (e.g. 5GB)")


def check_smoke(cfg: ExperimentConfig) -> None:
    s = cfg.smoke
    _positive("smoke.steps", s.steps)
    for i, name in enumerate(s.models):
        if name not in SMOKE_MODELS:
            raise ConfigError(f"smoke.models.{i}", name, f"must be one of {', '.join(SMOKE_MODELS)}")
    _unique("smoke.models", s.models)
    _positive("smoke.moe_num_experts", s.moe_num_experts)


def check_parallel_timeout(cfg: ExperimentConfig) -> None:
    _positive("parallel.timeout_minutes", cfg.parallel.timeout_minutes)


def check_plan(cfg: ExperimentConfig) -> None:
    """The planner's assumptions and the GPU it plans for."""
    if not 0 < cfg.plan.mfu <= 1:
        raise ConfigError("plan.mfu", cfg.plan.mfu, "must be a fraction in (0, 1]")
    if not cfg.plan.overhead_gb >= 0:
        raise ConfigError("plan.overhead_gb", cfg.plan.overhead_gb, "must be >= 0")
    _above_zero("cluster.gpu_memory_gb", cfg.cluster.gpu_memory_gb)
    _above_zero("cluster.gpu_peak_tflops", cfg.cluster.gpu_peak_tflops)


def check_config(cfg: ExperimentConfig) -> None:
    """Every section on its own: what can be checked before a stage reads any checkpoint.

    The CLI runs this first, so a bad value is reported as itself even when the stage would
    otherwise fail earlier on a missing input (finetune reads its checkpoint to learn the model).
    """
    check_choices(cfg)
    check_run(cfg)
    check_model(cfg)
    check_parallel_sizes(cfg)
    check_train(cfg)
    check_data(cfg)
    check_domain(cfg)
    check_stages(cfg)
    check_mix(cfg)
    check_finetune(cfg)
    check_baselines(cfg)
    check_eval(cfg)
    check_cluster(cfg)
    check_hf(cfg)
    check_smoke(cfg)
    check_plan(cfg)
    check_parallel_timeout(cfg)


def validate(cfg: ExperimentConfig, world_size: Optional[int] = None) -> int:
    """Check everything; return the world size the checks assumed."""
    check_config(cfg)
    world = resolve_world_size(cfg.parallel) if world_size is None else world_size
    check_parallel(cfg, world)
    check_batch(cfg, world)
    return world
