"""The training loop every training stage runs: seed, experts, MoE finetune, baselines.

Read it top to bottom: resume or initialise -> loop (evaluate, step, log, checkpoint) -> final
weights, manifest and compute-ledger entry. Everything a later stage needs is written into
`job.out_dir`; nothing is shared in memory.

Exactness on resume rests on three facts: the batch of step i is a pure function of (seed, i)
(see data/loader.py), the checkpoint holds model, optimizer, LR schedule and RNG state, and the
metric log is cut back to the resumed step. A killed run that is started again therefore
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from nemo_btx import progress
from nemo_btx.artifacts import software_versions, write_json_atomic, write_text_atomic
from nemo_btx.config import to_yaml
from nemo_btx.config.schema import ExperimentConfig, TrainStageConfig
from nemo_btx.errors import ConfigError
from nemo_btx.run_dir import CONFIG, LEDGER, MANIFEST, METRICS, ROUTING, WEIGHTS

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """What to train, on what, from what, and where to write it."""

    name: str
    """Stage label in logs, manifest and ledger (seed, expert:code, finetune, ...)."""
    out_dir: Path
    domains: List[str]
    """Training domains; the batch mixes them by `weights`."""
    weights: Optional[List[float]] = None
    init_from: Optional[Path] = None
    """Weights the run starts from (its parent); None = random init from train.seed."""
    eval_domains: List[str] = field(default_factory=list)
    stage: TrainStageConfig = field(default_factory=TrainStageConfig)
    parent: Optional[str] = None
    """Recorded in the manifest: what this model was trained from."""
    frozen: Optional[Callable[[str], bool]] = None
    """Parameter names that must not train (e.g. the experts in the frozen-experts ablation)."""
    ledger: Optional[Path] = None
    """The experiment's compute ledger (<run.dir>/ledger.jsonl); None = <out_dir>/ledger.jsonl."""


def stage_config(cfg: ExperimentConfig, stage: TrainStageConfig, train_iters: int) -> ExperimentConfig:
    """The experiment config with the stage's budget and optional LR/warmup overrides applied."""
    t = cfg.train
    train = dataclasses.replace(
        t, train_iters=train_iters,
        lr=stage.lr if stage.lr is not None else t.lr,
        warmup_iters=min(stage.warmup_iters if stage.warmup_iters is not None else t.warmup_iters,
                         max(train_iters - 1, 0)))
    return dataclasses.replace(cfg, train=train)


def async_save(cfg: ExperimentConfig) -> bool:
    """train.async_save, null = on on GPU (megatron-core's background writer), off on CPU."""
    if cfg.train.async_save is not None:
        return cfg.train.async_save
    return torch.cuda.is_available()


def device_metrics(cfg: ExperimentConfig, tokens_per_s_per_device: float, cpu: bool) -> dict:
    """Per step: tokens/s per device, this process's peak memory (GPU: what torch allocated;
    CPU: peak RSS) and on GPU the MFU against cluster.gpu_peak_tflops."""
    out = {"tokens_per_s_per_device": tokens_per_s_per_device}
    if cpu:
        import resource

        out["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    else:
        from nemo_btx.planner.flops import mfu

        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["mfu"] = mfu(cfg.model, tokens_per_s_per_device, cfg.cluster.gpu_peak_tflops * 1e12)
    return out


class _Metrics:
    """metrics.jsonl (source of the report's loss curves) plus TensorBoard scalars, rank 0 only."""

    def __init__(self, out_dir: Path, resume_step: int, enabled: bool, cfg: Optional[ExperimentConfig] = None,
                 name: str = ""):
        self.enabled = enabled
        self.path = out_dir / METRICS
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if cfg is not None and cfg.logging.wandb:
            self.wandb = _wandb_run(cfg, out_dir, name)
        # Drop what a killed run logged after its last checkpoint: those steps will be redone.
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            log.warning("tensorboardX not installed: no TensorBoard scalars")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "valid":
                    for dom, loss in value.items():
                        self.tb.add_scalar(f"valid/{dom}_loss", loss, step)
                elif key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            flat = {f"train/{k}": v for k, v in record.items() if k not in ("step", "valid")}
            flat.update({f"valid/{d}_loss": v for d, v in record.get("valid", {}).items()})
            self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(cfg: ExperimentConfig, out_dir: Path, name: str):
    """A W&B run for one training stage: its id is derived from the stage's directory, so a
    resumed stage appends to the same run (`resume="allow"`)."""
    import hashlib

    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb", True, "wandb is not installed: pip install 'nemo-btx[wandb]'") from None
    run_id = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=name or out_dir.name,
                      id=run_id, resume="allow", dir=str(out_dir), config={"yaml": to_yaml(cfg)})


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on an interactive terminal (rank 0); None means log lines (Slurm logs)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def evaluate(cfg: ExperimentConfig, chunks, valid: Dict[str, list], device, dp_rank, dp_size,
             recorder=None) -> Dict[str, float]:
    """Mean validation loss per domain over its fixed held-out batches.

    With a RoutingRecorder (MoE models), also counts where each domain's tokens are routed.
    """
    from contextlib import nullcontext

    from nemo_btx.training.batches import rank_microbatches
    from nemo_btx.training.step import eval_loss

    out = {}
    for domain, batches in valid.items():
        with recorder.domain(domain) if recorder is not None else nullcontext():
            losses = [eval_loss(cfg, chunks, rank_microbatches(cfg, b, dp_rank, dp_size, device))
                      for b in batches]
        out[domain] = sum(losses) / len(losses)
    return out


def run_training(cfg: ExperimentConfig, job: TrainJob, rt,
                 batch_fn: Callable[[int], torch.Tensor], valid: Dict[str, list]) -> dict:
    """Train `cfg.train.train_iters` steps (resuming if a checkpoint exists); return a summary.

    `batch_fn(step)` returns the global batch `[global_batch, seq+1]` of that step; `valid`
    maps domain -> fixed validation global batches. Call inside an initialised runtime.
    """
    from megatron.core import parallel_state

    from nemo_btx.model.build import build_model, model_flops_per_token
    from nemo_btx.runtime import preemption
    from nemo_btx.runtime.distributed import seed_everything
    from nemo_btx.training import checkpoint as ckpt
    from nemo_btx.training.batches import rank_microbatches
    from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, gather_params, train_step

    out, t, stage = Path(job.out_dir), cfg.train, job.stage
    ckpt_root = out / "checkpoints"
    ckpt.clean_incomplete(ckpt_root)

    chunks = build_model(cfg, frozen=job.frozen)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    attach_megatron_hooks(chunks, optimizer)

    start, spent_before = 0, {"wall_s": 0.0, "device_seconds": 0.0}
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is not None:
        state = ckpt.load_training_checkpoint(latest, chunks, optimizer, scheduler, cfg.model)
        start = state["step"]
        # Time spent before the kill up to that checkpoint counts; what was lost after it is
        # redone and counted once, so a resumed stage's totals equal an uninterrupted one's.
        spent_before = {k: float(state["extra"].get(k, 0.0)) for k in spent_before}
        if not state["same_layout"]:
            seed_everything(t.seed + start)
        log.info("%s: resumed from %s (step %d)", job.name, latest, start)
    elif job.init_from is not None:
        ckpt.load_model_weights(chunks, job.init_from, cfg.model)
        log.info("%s: initialised from %s", job.name, job.init_from)

    # Only now, with every input loaded, does the run write anything of its own.
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / CONFIG, to_yaml(cfg))
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), rt.dp_size
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    flops_per_token = model_flops_per_token(cfg.model)
    metrics = _Metrics(out, start, enabled=rt.is_main, cfg=cfg, name=job.name)
    bar = _progress(t.train_iters, start, enabled=rt.is_main)
    reporter = progress.Reporter("step", t.train_iters)  # for `nemo-btx run`'s status line
    preemption.install()  # USR1 (Slurm, before the time limit) -> checkpoint and stop
    saver = ckpt.AsyncSaver() if async_save(cfg) else None
    t0, steps_run = time.perf_counter(), 0
    last_valid: Dict[str, float] = {}
    try:
        for step in range(start, t.train_iters):
            micro = rank_microbatches(cfg, batch_fn(step), dp_rank, dp_size, rt.device)
            r = train_step(cfg, chunks, optimizer, scheduler, micro)
            if saver is not None:
                saver.poll()  # publish a background save that finished (collective)
            done = step + 1
            steps_run += 1
            rate = tokens_per_step * steps_run / (time.perf_counter() - t0)
            record = {"step": done, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
                      "tokens": done * tokens_per_step, "tokens_per_s": rate,
                      **device_metrics(cfg, rate / rt.world_size, rt.is_cpu)}
            if valid and (done % stage.eval_interval == 0 or done == t.train_iters):
                last_valid = evaluate(cfg, chunks, valid, rt.device, dp_rank, dp_size)
                record["valid"] = last_valid
            metrics.write(record)
            reporter.update(done, eta_s=(t.train_iters - done) * tokens_per_step / rate)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{rate:.0f}")
            elif rt.is_main and (done % t.log_interval == 0 or done == t.train_iters or "valid" in record):
                eta = (t.train_iters - done) * tokens_per_step / rate
                log.info("%s step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f%s peak mem %.1f GB "
                         "eta %.0fs%s",
                         job.name, done, t.train_iters, r.loss, r.lr, r.grad_norm, rate,
                         f" MFU {record['mfu']:.1%}" if "mfu" in record else "", record["peak_memory_gb"], eta,
                         "" if "valid" not in record else " valid " + " ".join(
                             f"{d}={v:.3f}" for d, v in record["valid"].items()))
            # Collective (every rank, every step): all ranks stop at the same step.
            stop = done < t.train_iters and preemption.stop_requested()
            if stop or done % stage.save_interval == 0 or done == t.train_iters:
                so_far = time.perf_counter() - t0
                gather_params(chunks)
                ckpt.save_training_checkpoint(
                    ckpt_root, chunks, optimizer, scheduler, done, cfg.model,
                    extra={"tokens_seen": done * tokens_per_step,
                           "wall_s": spent_before["wall_s"] + so_far,
                           "device_seconds": spent_before["device_seconds"] + so_far * rt.world_size},
                    keep=stage.keep_checkpoints, gather=t.optimizer_save_gather, saver=saver)
            if stop:
                if saver is not None:
                    saver.wait()  # the checkpoint the requeued job resumes from is complete
                log.info("%s: stop requested: checkpoint at step %d saved; exiting with %d to be "
                         "requeued", job.name, done, preemption.EXIT_REQUEUE)
                raise preemption.Requeue()
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    if saver is not None:
        saver.wait()  # the last checkpoint is published before the stage's outputs

    wall = time.perf_counter() - t0
    routing = None
    if valid and cfg.model.moe.num_experts is not None:
        # A final pass over every domain with the routers observed: the routing analysis.
        from nemo_btx.training.routing import RoutingRecorder

        recorder = RoutingRecorder(chunks)
        last_valid = evaluate(cfg, chunks, valid, rt.device, dp_rank, dp_size, recorder)
        routing = recorder.fractions()
        recorder.close()
        if rt.is_main:
            write_json_atomic(out / ROUTING, {"domains": list(valid), "fractions": routing,
                                                     "num_experts": cfg.model.moe.num_experts,
                                                     "router_topk": cfg.model.moe.router_topk})
    elif not last_valid and valid:
        last_valid = evaluate(cfg, chunks, valid, rt.device, dp_rank, dp_size)
    gather_params(chunks)
    ckpt.save_model_weights(chunks, out / WEIGHTS, cfg.model, extra={"stage": job.name})
    tokens_total = t.train_iters * tokens_per_step
    summary = {
        "stage": job.name, "steps": t.train_iters, "tokens_seen": t.train_iters * tokens_per_step,
        "valid_loss": last_valid, "parent": job.parent, "domains": job.domains,
        "weights": WEIGHTS, "train_flops_per_token": flops_per_token,
    }
    if rt.is_main:
        # The stage's totals (all segments), so the last line per `out` is what it cost.
        ledger = Path(job.ledger or out / LEDGER)
        append_ledger(ledger, {
            "stage": job.name, "out": _relative(out, ledger.parent), "steps": [0, t.train_iters],
            "tokens": tokens_total, "flops": tokens_total * flops_per_token,
            "wall_s": spent_before["wall_s"] + wall,
            "device_seconds": spent_before["device_seconds"] + wall * rt.world_size,
            "world_size": rt.world_size, "device": rt.device.type, "threads": torch.get_num_threads(),
            "segment": {"steps": [start, t.train_iters], "wall_s": wall},
        })
        write_json_atomic(out / MANIFEST, {
            **summary, "config": to_yaml(cfg), "versions": software_versions(), "complete": True,
        })
    torch.distributed.barrier()
    return summary


def _relative(path: Path, root: Path) -> str:
    """`path` relative to the ledger's directory when inside it, so a moved or copied run
    directory keeps a ledger that still names its own outputs."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def append_ledger(path: Path, entry: dict) -> None:
    """One line per finished run segment, written in one append; each line holds the stage's
    totals so far, so readers take the last line per `out` (budget.stage_totals)."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
