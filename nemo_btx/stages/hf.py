"""Commands `import-hf` and `export-hf`: Hugging Face checkpoints in and out of a run.

    nemo-btx import-hf hf.path=/models/Llama-2-7b-hf      -> <run.dir>/imported
    nemo-btx export-hf hf.model=btx                        -> <run.dir>/hf/btx (Mixtral)
    nemo-btx export-hf hf.model=seed hf.dtype=bfloat16     -> <run.dir>/hf/seed (Llama)

The conversions live in `nemo_btx/hf/`; this module only resolves paths from the config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_btx.config.schema import ExperimentConfig, expert_domains
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.run_dir import MANIFEST, RunDir, checkpoint_tokenizer, find_run_dir

log = logging.getLogger(__name__)


def import_hf(cfg: ExperimentConfig) -> Path:
    """Convert the Llama model at hf.path into a megatron-core checkpoint (the seed-to-be)."""
    from nemo_btx.artifacts import read_json
    from nemo_btx.hf.importer import import_hf
    from nemo_btx.training.checkpoint import is_complete

    if not cfg.hf.path:
        raise ConfigError("hf.path", cfg.hf.path, "import-hf needs the Hugging Face model directory")
    src = Path(cfg.hf.path).expanduser()
    if not src.is_dir():
        raise ConfigError("hf.path", cfg.hf.path, "no such directory")
    out = Path(cfg.hf.out) if cfg.hf.out else RunDir.of(cfg).imported
    if is_complete(out):
        manifest = out / MANIFEST
        done = read_json(manifest) if manifest.is_file() else {}
        if done.get("source") == str(src.resolve()):
            log.info("import-hf: %s already holds %s, skipping", out, src)
            return out
        raise ConfigError("hf.out", str(out), f"already holds a checkpoint (of {done.get('source')}); "
                          "choose another hf.out or remove it")
    if out.exists():
        raise ConfigError("hf.out", str(out), "exists and is not a complete import; remove it")
    model = import_hf(src, out, cfg.model, dtype=cfg.hf.dtype)
    # Every later stage builds this model: it needs the overrides (or a conf/model preset).
    manifest = read_json(out / MANIFEST)
    common = " ".join([f"run.dir={cfg.run.dir}", *manifest["overrides"]])
    tokenizer = checkpoint_tokenizer(out) if manifest["tokenizer"] else "<its tokenizer.json>"
    log.info("import-hf: %s is ready as the seed; next:", model.name)
    log.info("  nemo-btx data %s data.tokenizer.kind=hf data.tokenizer.path=%s", common, tokenizer)
    log.info("  nemo-btx seed %s data.tokenizer.kind=hf data.tokenizer.path=%s seed.checkpoint=%s",
             common, tokenizer, out)
    return out


def export_hf(cfg: ExperimentConfig) -> Path:
    """Write a checkpoint of the run (hf.model) or any checkpoint (hf.path) as a HF model."""
    from nemo_btx.hf.exporter import export_checkpoint
    from nemo_btx.config.sizes import parse_size
    from nemo_btx.training.checkpoint import is_complete

    if cfg.hf.path:
        src, label = Path(cfg.hf.path).expanduser(), Path(cfg.hf.path).name
        if not is_complete(src):
            raise ConfigError("hf.path", cfg.hf.path, "not a complete checkpoint directory")
    else:
        rd = RunDir.of(cfg)
        models = {m.name: m for m in rd.models(expert_domains(cfg), cfg.baselines.which) if not m.ensemble}
        if cfg.hf.model not in models:
            raise ConfigError("hf.model", cfg.hf.model, f"one of {', '.join(models)} (or set hf.path "
                              "to a checkpoint directory)")
        candidates = [rd.root / c for c in models[cfg.hf.model].checkpoints]
        found = [p for p in candidates if is_complete(p)]
        if not found:
            raise BtxError(f"model {cfg.hf.model!r}: no complete checkpoint at "
                           f"{', '.join(map(str, candidates))}")
        src, label = found[0], cfg.hf.model
    try:
        max_bytes = parse_size(cfg.hf.max_shard_size)
    except ValueError as err:
        raise ConfigError("hf.max_shard_size", cfg.hf.max_shard_size, str(err)) from None
    out = Path(cfg.hf.out) if cfg.hf.out else RunDir.of(cfg).hf_export(label)
    # An imported checkpoint carries its own tokenizer; a run's checkpoints use the run's.
    tokenizer = checkpoint_tokenizer(src)
    if not (tokenizer / "tokenizer.json").is_file():
        tokenizer = RunDir(find_run_dir(src) or cfg.run.dir).tokenizer
    if not (tokenizer / "tokenizer.json").is_file():
        log.warning("export-hf: no tokenizer at %s; writing the model without one", tokenizer)
        tokenizer = None
    export_checkpoint(src, out, dtype=cfg.hf.dtype, max_shard_bytes=max_bytes, tokenizer_dir=tokenizer)
    return out
