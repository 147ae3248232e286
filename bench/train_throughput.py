#!/usr/bin/env python
"""Training throughput: our megatron-core training step vs a plain PyTorch loop, same tiny model.

Issue 3's target: the megatron-core loop reaches >= 0.95x the tokens/s of a plain PyTorch loop
on the same model, i.e. the framework adds no overhead worth speaking of.

Both sides do the same work per optimizer step, in ONE process, on the same threads:

* megatron: exactly `nemo_btx.training.step.train_step` (megatron schedule, megatron DDP with
  its contiguous grad buffer, megatron fp32 optimizer = torch AdamW with clipping, megatron's
  OptimizerParamScheduler) on `build_model(cfg)`, one process via `init_runtime`.
* plain: the same Llama-style architecture written in plain PyTorch (embedding, RMSNorm
  pre-norm, causal self-attention with RoPE through `F.scaled_dot_product_attention`, SwiGLU
  MLP, final RMSNorm, untied output layer, no biases, megatron's padded vocabulary), started
  from a COPY of the megatron weights; `torch.optim.AdamW` with the same lr/betas/eps, weight
  decay on matrices only (megatron skips 1-D params), the same warmup + decay LR formula,
  `clip_grad_norm_` to the same norm, and gradient accumulation over the same micro-batches.

Parameter counts are asserted equal, and the per-step losses of the two sides are printed: they
start identical (same weights, same batch) and stay close, which shows the two loops really
train the same model the same way.

Timing is interleaved so that machine noise hits both sides alike: by default the sides
alternate every optimizer step (A B A B ..., the pair order flipping each repeat), after
`--warmup` untimed steps of each; `--interleave block` alternates blocks of `warmup + steps`
steps instead.  Per-step wall time is taken around one whole optimizer step (forward, backward,
clipping, update, LR step, loss read-out); batches are built beforehand.  tokens/s =
global_batch * seq / median step time over all timed steps.  Every step also records how much
CPU other processes burnt meanwhile (from /proc/stat minus our own CPU time): the "quiet"
figures use only the steps during which that stayed under `--quiet-cores`, which is what to
read on a shared machine.  With 2 threads on 2 busy cores, OpenMP steps can stall for seconds;
`--threads 1` is far less sensitive to other load.  Peak RSS per side comes from a separate
short subprocess per side (`--only`), since both models share the timing process.

    .venv/bin/python bench/train_throughput.py --steps 20 --repeats 3 --json runs/bench/train.json
    .venv/bin/python bench/train_throughput.py model.num_layers=2 train.micro_batch_size=2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SIDES = ("megatron", "plain")


# ------------------------------------------------------------------------------------------
# The plain PyTorch reference model
# ------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal self-attention, fused QKV laid out like megatron's (per query group: q.., k, v)."""

    def __init__(self, hidden: int, heads: int, groups: int, head_dim: int):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.per_group = heads // groups
        self.linear_qkv = nn.Linear(hidden, groups * (self.per_group + 2) * head_dim, bias=False)
        self.linear_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.linear_qkv(x).view(b, s, self.groups, self.per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.per_group].reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.per_group].transpose(1, 2)
        v = qkv[:, :, :, self.per_group + 1].transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.groups != self.heads)
        return self.linear_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden, 2 * ffn, bias=False)  # [gate; up], as megatron
        self.linear_fc2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, hidden, ffn, heads, groups, head_dim, eps):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.self_attention = Attention(hidden, heads, groups, head_dim)
        self.pre_mlp_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.mlp = SwiGLU(hidden, ffn)

    def forward(self, x, cos, sin):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class PlainLlama(nn.Module):
    def __init__(self, *, vocab: int, hidden: int, ffn: int, layers: int, heads: int,
                 groups: int, head_dim: int, seq: int, eps: float, rotary_base: float,
                 init_std: float = 0.02):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, ffn, heads, groups, head_dim, eps)
                                    for _ in range(layers))
        self.final_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.output_layer = nn.Linear(hidden, vocab, bias=False)
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [s, d], broadcast over [b, heads, s, d]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output_layer(self.final_layernorm(x))


def plain_model_for(cfg) -> PlainLlama:
    from nemo_btx.model.build import padded_vocab_size

    m = cfg.model
    heads = m.num_attention_heads
    return PlainLlama(
        vocab=padded_vocab_size(m, cfg.parallel.tp), hidden=m.hidden_size, ffn=m.ffn_hidden_size,
        layers=m.num_layers, heads=heads, groups=m.num_query_groups or heads,
        head_dim=m.kv_channels or m.hidden_size // heads,
        seq=m.max_position_embeddings or m.seq_length, eps=m.norm_epsilon,
        rotary_base=m.rotary_base, init_std=m.init_method_std)


def megatron_to_plain_name(name: str) -> str:
    """megatron local-spec parameter name -> PlainLlama parameter name."""
    name = name.replace("embedding.word_embeddings.", "embedding.")
    name = name.replace("decoder.layers.", "layers.").replace("decoder.final_layernorm.", "final_layernorm.")
    return name


def copy_megatron_weights(plain: PlainLlama, megatron_model: nn.Module) -> None:
    mine = dict(plain.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, p in megatron_model.named_parameters():
            target = megatron_to_plain_name(name)
            assert target in mine, f"megatron parameter {name} has no plain counterpart ({target})"
            assert mine[target].shape == p.shape, (name, mine[target].shape, p.shape)
            mine[target].copy_(p)
            seen.add(target)
    missing = set(mine) - seen
    assert not missing, f"plain parameters without megatron counterpart: {sorted(missing)}"


class PlainLR:
    """megatron's OptimizerParamScheduler formula (linear warmup, then linear/cosine decay)."""

    def __init__(self, optimizer, t):
        self.opt, self.t, self.num_steps = optimizer, t, 0
        self.init_lr = 0.0 if t.warmup_iters else t.lr
        self.step(0)

    def lr(self) -> float:
        t, n = self.t, self.num_steps
        max_lr, min_lr = t.lr, t.lr * t.min_lr_ratio
        if t.warmup_iters > 0 and n <= t.warmup_iters:
            return self.init_lr + (max_lr - self.init_lr) * n / t.warmup_iters
        if t.lr_decay_style == "constant":
            return max_lr
        if n > t.train_iters:
            return min_lr
        ratio = (n - t.warmup_iters) / (t.train_iters - t.warmup_iters)
        coeff = 1.0 - ratio if t.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        lr = self.lr()
        for g in self.opt.param_groups:
            g["lr"] = lr


class PlainTrainer:
    def __init__(self, cfg, model: PlainLlama):
        t = cfg.train
        self.cfg, self.model = cfg, model
        decay = [p for p in model.parameters() if p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": t.weight_decay}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        self.scheduler = PlainLR(self.optimizer, t)

    def step(self, microbatches: List[Dict[str, torch.Tensor]]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        n = len(microbatches)
        total = 0.0
        for mb in microbatches:
            logits = self.model(mb["tokens"])
            losses = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(),
                                     reduction="none")
            mask = mb["loss_mask"].flatten()
            loss = (losses * mask).sum() / mask.sum()
            (loss / n).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        self.optimizer.step()
        self.scheduler.step(1)
        return float(total) / n


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------


def load_cfg(overrides: List[str]):
    from nemo_btx.config import load_config

    base = ["train.precision=fp32"]
    return load_config(base + list(overrides))


def make_batches(cfg, n: int, device) -> List[List[Dict[str, torch.Tensor]]]:
    from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch

    return [rank_microbatches(cfg, synthetic_global_batch(cfg, i), 0, 1, device) for i in range(n)]


class CpuLoad:
    """Load average and the CPU time other processes burnt while we ran (in cores)."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.start()

    def busy(self) -> float:
        c = self.psutil.cpu_times()
        return sum(c) - c.idle - getattr(c, "iowait", 0.0)

    def own(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system

    def start(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self.busy(), self.own()
        self.loadavg0 = os.getloadavg()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy, own = self.busy() - self.busy0, self.own() - self.own0
        return {"loadavg_before": list(self.loadavg0), "loadavg_after": list(os.getloadavg()),
                "wall_s": wall, "own_cpu_cores": own / wall,
                "other_processes_cpu_cores": max(0.0, (busy - own) / wall),
                "cpu_count": os.cpu_count()}


def quiet_stats(times: List[float], other: List[float], tokens: int, limit: float) -> dict:
    """The same figures over the steps during which other processes used < `limit` cores."""
    quiet = [t for t, o in zip(times, other) if o < limit]
    if not quiet:
        return {"quiet_steps": 0}
    med = statistics.median(quiet)
    return {"quiet_steps": len(quiet), "quiet_median_step_s": med, "quiet_tokens_per_s": tokens / med}


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux: VmHWM, which (unlike ru_maxrss, inherited over
    fork + exec from the parent) starts afresh in an exec'd child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if platform.system() == "Linux" else kb / 1024.0 / 1024.0


def run(args) -> dict:
    import logging

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.overrides)
    m, t = cfg.model, cfg.train
    assert cfg.parallel.tp == cfg.parallel.pp == cfg.parallel.ep == cfg.parallel.cp == 1, \
        "single-process benchmark: tp/pp/ep/cp must be 1"
    assert m.moe.num_experts is None, "dense models only (MoE is not part of this benchmark)"
    assert m.position_embedding_type == "rope" and m.activation == "swiglu" \
        and m.normalization == "RMSNorm" and m.untie_embeddings_and_output_weights, \
        "the plain reference implements the Llama-style tiny architecture only"
    logging.basicConfig(level=logging.WARNING)
    sides = [args.only] if args.only else list(SIDES)
    tokens_per_step = t.global_batch_size * m.seq_length
    device = torch.device("cpu")
    batches = make_batches(cfg, args.batches, device)
    rss_baseline = peak_rss_mb()  # python + torch + config, before any model or megatron import

    runners, params, losses = {}, {}, {s: [] for s in sides}
    mega_model = None
    rt = None
    if "megatron" in sides:
        from nemo_btx.model.build import build_model, count_parameters, unwrap
        from nemo_btx.runtime.distributed import init_runtime
        from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, train_step

        rt = init_runtime(cfg)
        assert rt.is_cpu and rt.world_size == 1
        chunks = build_model(cfg)
        optimizer, scheduler = build_optimizer(cfg, chunks)
        attach_megatron_hooks(chunks, optimizer)
        mega_model = unwrap(chunks[0])
        params["megatron"] = count_parameters(chunks)
        runners["megatron"] = lambda mb: train_step(cfg, chunks, optimizer, scheduler, mb).loss
    if "plain" in sides:
        torch.manual_seed(t.seed)
        plain = plain_model_for(cfg)
        if mega_model is not None:
            copy_megatron_weights(plain, mega_model)
        params["plain"] = sum(p.numel() for p in plain.parameters())
        trainer = PlainTrainer(cfg, plain)
        runners["plain"] = trainer.step
    if len(sides) == 2:
        assert params["megatron"] == params["plain"], params
        # Same weights and the same batch: the very first losses must agree.
        with torch.no_grad():
            mega_model.eval(); plain.eval()
            mb = batches[0][0]
            ref = F.cross_entropy(plain(mb["tokens"]).flatten(0, 1), mb["labels"].flatten())
            out = mega_model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
            mega_loss = out.float().mean()
            mega_model.train(); plain.train()
        assert torch.allclose(ref, mega_loss, rtol=1e-4, atol=1e-5), (float(ref), float(mega_loss))

    times: Dict[str, List[float]] = {s: [] for s in sides}
    foreign: Dict[str, List[float]] = {s: [] for s in sides}
    cpu: Dict[str, List[float]] = {s: [] for s in sides}
    step_counter = {s: 0 for s in sides}
    load = CpuLoad()

    def one_step(side: str, timed: bool) -> None:
        mb = batches[step_counter[side] % len(batches)]
        step_counter[side] += 1
        busy0, own0 = load.busy(), load.own()
        c0, t0 = time.process_time(), time.perf_counter()
        loss = runners[side](mb)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        other = max(0.0, (load.busy() - busy0) - (load.own() - own0)) / dt
        losses[side].append(loss)
        if timed:
            times[side].append(dt)
            foreign[side].append(other)
            cpu[side].append(dc)

    def report(rep: int, side: str, n: int) -> None:
        if not args.quiet:
            med = statistics.median(times[side][-n:])
            print(f"  repeat {rep + 1}/{args.repeats} {side:8s}: median step {med * 1e3:7.1f} ms "
                  f"({tokens_per_step / med:8.0f} tokens/s), loss {losses[side][-1]:.4f}",
                  flush=True)

    if args.interleave == "step":
        # A B A B ... per optimizer step (warmup once per side); the pair order flips each repeat.
        for _ in range(args.warmup):
            for side in sides:
                one_step(side, timed=False)
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]
            for _ in range(args.steps):
                for side in order:
                    one_step(side, timed=True)
            for side in order:
                report(rep, side, args.steps)
    else:
        # Blocks of warmup + steps per side, alternating which side goes first.
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                for i in range(args.warmup + args.steps):
                    one_step(side, timed=i >= args.warmup)
                report(rep, side, args.steps)
    load_info = load.stop()

    if rt is not None:
        from nemo_btx.runtime.distributed import shutdown
        shutdown()

    results = {}
    for side in sides:
        ts = sorted(times[side])
        med = statistics.median(ts)
        results[side] = {
            "parameters": params[side],
            "median_step_s": med,
            "mean_step_s": statistics.fmean(ts),
            "min_step_s": ts[0],
            "p90_step_s": ts[min(len(ts) - 1, int(0.9 * len(ts)))],
            "tokens_per_s": tokens_per_step / med,
            "timed_steps": len(ts),
            "median_step_cpu_s": statistics.median(cpu[side]),
            "step_times_s": times[side],
            "step_cpu_times_s": cpu[side],
            "other_processes_cpu_cores_per_step": foreign[side],
            **quiet_stats(times[side], foreign[side], tokens_per_step, args.quiet_cores),
            "losses": losses[side],
        }
    out = {
        "benchmark": "train_throughput",
        "config": {"overrides": args.overrides, "num_layers": m.num_layers,
                   "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
                   "num_attention_heads": m.num_attention_heads, "vocab_size": m.vocab_size,
                   "seq_length": m.seq_length, "micro_batch_size": t.micro_batch_size,
                   "global_batch_size": t.global_batch_size, "precision": "fp32",
                   "tokens_per_step": tokens_per_step},
        "protocol": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                     "interleave": args.interleave, "quiet_cores": args.quiet_cores,
                     "threads": torch.get_num_threads(), "interleaved": len(sides) == 2},
        "results": results,
        "load": load_info,
        "process_peak_rss_mb": peak_rss_mb(),
        "process_baseline_rss_mb": rss_baseline,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if len(sides) == 2:
        q = [results[s].get("quiet_tokens_per_s") for s in SIDES]
        if all(q):
            out["quiet_ratio_megatron_over_plain"] = q[0] / q[1]
        la, lb = results["megatron"]["losses"], results["plain"]["losses"]
        out["max_abs_loss_difference"] = max(abs(a - b) for a, b in zip(la, lb))
        out["cpu_time_ratio_plain_over_megatron"] = (
            results["plain"]["median_step_cpu_s"] / results["megatron"]["median_step_cpu_s"])
        out["ratio_megatron_over_plain"] = results["megatron"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        out["target_ratio"] = 0.95
        out["meets_target"] = out["ratio_megatron_over_plain"] >= 0.95
    if "megatron" in sides:  # (not imported at all by a plain-only run, for its peak RSS)
        import megatron.core
        out["versions"]["megatron_core"] = megatron.core.__version__
    return out


_START_ENV = dict(os.environ)  # before init_runtime sets MASTER_ADDR/PORT for this process


def measure_peak_rss(args) -> Dict[str, Optional[float]]:
    """Peak RSS of a short run of each side alone, in its own process."""
    rss = {}
    for side in SIDES:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "r.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", side, "--steps", "3",
                   "--warmup", "1", "--repeats", "1", "--threads", str(args.threads),
                   "--no-memory", "--quiet", "--json", str(path), *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_START_ENV)
            if proc.returncode != 0:
                print(f"peak RSS run of {side} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                rss[side] = None
                continue
            res = json.loads(path.read_text())
            rss[side] = res["process_peak_rss_mb"]
            rss[f"{side}_over_baseline"] = res["process_peak_rss_mb"] - res["process_baseline_rss_mb"]
    return rss


def print_table(out: dict) -> None:
    r = out["results"]
    print()
    print(f"{'side':10s} {'params':>10s} {'median ms':>10s} {'p90 ms':>8s} {'tokens/s':>10s} "
          f"{'quiet tok/s (n)':>16s} {'peak RSS MB':>12s} {'loss first->last':>18s}")
    for side, res in r.items():
        rss = out.get("peak_rss_mb", {}).get(side)
        extra = out.get("peak_rss_mb", {}).get(f"{side}_over_baseline")
        rss_txt = f"{rss:.0f} (+{extra:.0f})" if rss else "-"
        quiet = (f"{res['quiet_tokens_per_s']:.0f} ({res['quiet_steps']})"
                 if res.get("quiet_steps") else "- (0)")
        print(f"{side:10s} {res['parameters']:10d} {res['median_step_s'] * 1e3:10.1f} "
              f"{res['p90_step_s'] * 1e3:8.1f} {res['tokens_per_s']:10.0f} {quiet:>16s} "
              f"{rss_txt:>12s} "
              f"{res['losses'][0]:8.4f}->{res['losses'][-1]:.4f}")
    if "ratio_megatron_over_plain" in out:
        ratio = out["ratio_megatron_over_plain"]
        print(f"\nratio megatron/plain tokens/s: {ratio:.3f} (target >= 0.95: "
              f"{'met' if out['meets_target'] else 'NOT met'})")
        print(f"same training: max |loss(megatron) - loss(plain)| over all steps = "
              f"{out['max_abs_loss_difference']:.2e}")
        if "quiet_ratio_megatron_over_plain" in out:
            print(f"ratio over quiet steps only (other processes < {out['protocol']['quiet_cores']} "
                  f"cores): {out['quiet_ratio_megatron_over_plain']:.3f}")
    if "cpu_time_ratio_plain_over_megatron" in out:
        print(f"CPU time per step (all our threads): megatron "
              f"{r['megatron']['median_step_cpu_s'] * 1e3:.1f} ms, plain "
              f"{r['plain']['median_step_cpu_s'] * 1e3:.1f} ms, plain/megatron = "
              f"{out['cpu_time_ratio_plain_over_megatron']:.3f}"
              + ("" if out["protocol"]["threads"] == 1 else
                 " (with >1 thread this includes OpenMP spin-waiting)"))
    if out.get("peak_rss_mb"):
        print("peak RSS: each side alone in its own process; (+N) = above the same process "
              "before building anything (python + torch + config)")
    ld = out["load"]
    print(f"load: loadavg {ld['loadavg_before'][0]:.2f} -> {ld['loadavg_after'][0]:.2f}, other "
          f"processes used {ld['other_processes_cpu_cores']:.2f} of {ld['cpu_count']} cores "
          f"during the timed run; threads={out['protocol']['threads']}, "
          f"interleave={out['protocol']['interleave']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. model.num_layers=2)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side per repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side: once at the start (step mode) or per block")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of `steps` timed steps per side (pair order flips each repeat)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads (same for both sides)")
    ap.add_argument("--batches", type=int, default=4, help="distinct global batches, cycled")
    ap.add_argument("--interleave", choices=("step", "block"), default="step",
                    help="alternate the sides every optimizer step (default) or every block")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="a step is 'quiet' when other processes used fewer cores than this")
    ap.add_argument("--only", choices=SIDES, help="run one side alone (used for peak RSS)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    out = run(args)
    if not args.only and not args.no_memory:
        out["peak_rss_mb"] = measure_peak_rss(args)
    if not args.quiet:
        print_table(out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
