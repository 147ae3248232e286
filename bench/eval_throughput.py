#!/usr/bin/env python
"""Evaluation throughput: batched vs one-at-a-time MMLU loglikelihood, and BTM top-2 vs an MoE
top-2 per token on the same requests.

The requests are the real ones lm-eval builds for btx_mmlu (5-shot prompts, 4 choices each),
recorded once and replayed against each model, so every side scores exactly the same tokens:

1. the seed (dense) with `--batch-size` requests per forward pass vs batch size 1;
"One at a time" sends each request alone (no batching, and the 4 choices of a question do not
share their context's forward pass, which batched scoring does).

2. `nemo-btx-btm` top-2 over the run's experts (every expert runs on every token) vs an MoE
   top-2 of the same expert size (`<run>/btx/mixed/weights` if the mix stage ran, else a random
   MoE with one expert per domain built with `build_model`: cost does not depend on weights).

Reported: requests/s, scored tokens/s and ms per 1k tokens, with the best of `--repeats` runs.

    .venv/bin/python bench/eval_throughput.py --run-dir runs/tiny --per-subject 2 --json runs/bench/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def record_mmlu_requests(per_subject: int):
    """lm-eval's btx_mmlu loglikelihood requests for the first `per_subject` questions each."""
    from lm_eval.api.model import LM

    from nemo_btx.evaluation.runner import run_tasks

    class Recorder(LM):
        def __init__(self):
            super().__init__()
            self.requests = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.requests.extend(requests)
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    rec = Recorder()
    run_tasks(rec, ["btx_mmlu"], limit=per_subject)
    return rec.requests


def moe_checkpoint(run_dir: Path, num_experts: int, tmp: Path) -> Path:
    from nemo_btx.run_dir import RunDir
    from nemo_btx.training.checkpoint import is_complete

    for rel in RunDir(run_dir).model("btx", []).checkpoints:  # finetuned, else mixed
        if is_complete(run_dir / rel):
            return run_dir / rel
    import subprocess

    code = f"""
import torch
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.evaluation.model import model_config_from_marker
from nemo_btx.model.build import build_model
from nemo_btx.runtime.distributed import init_runtime, shutdown
from nemo_btx.training.checkpoint import read_marker, save_model_weights
m = model_config_from_marker(read_marker({str(run_dir / 'seed' / 'weights')!r}))
m.moe.num_experts, m.moe.router_topk = {num_experts}, 2
cfg = ExperimentConfig(model=m)
init_runtime(cfg)
torch.manual_seed(0)
save_model_weights(build_model(cfg, wrap_ddp=False), {str(tmp / 'moe')!r}, m)
shutdown()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return tmp / "moe"


def timed(lm, requests, repeats: int, one_call_each: bool = False):
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        if one_call_each:  # no batching and no sharing of a context between the choices
            for r in requests:
                lm.loglikelihood([r], disable_tqdm=True)
        else:
            lm.loglikelihood(requests, disable_tqdm=True)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/tiny")
    ap.add_argument("--per-subject", type=int, default=2, help="MMLU questions per subject")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from nemo_btx.evaluation.btm import BTMLM
    from nemo_btx.evaluation.lm import NemoBtxLM
    from nemo_btx.run_dir import RunDir

    run_dir = Path(args.run_dir)
    requests = record_mmlu_requests(args.per_subject)
    seed = NemoBtxLM(str(run_dir / RunDir(run_dir).model("seed", []).checkpoints[0]), batch_size=args.batch_size)
    tokens = 0
    for r in requests:
        ctx, cont = seed._encode_pair(*r.args)
        tokens += min(len(ctx) + len(cont), seed.max_length + 1) - 1
    rows = {}

    def measure(label, lm, batch_size, one_call_each=False):
        lm.batch_size = batch_size
        lm.loglikelihood(requests[: 2 * batch_size], disable_tqdm=True)  # warm-up
        t = timed(lm, requests, args.repeats, one_call_each)
        rows[label] = {"seconds": t, "requests_per_s": len(requests) / t, "tokens_per_s": tokens / t,
                       "ms_per_1k_tokens": 1000 * t / tokens * 1000, "batch_size": batch_size}
        print(f"{label:<28} batch {batch_size:>3}  {len(requests) / t:8.1f} req/s  "
              f"{tokens / t:9.0f} tok/s  {1e6 * t / tokens:7.2f} ms/1k tok", flush=True)

    print(f"{len(requests)} MMLU loglikelihood requests ({args.per_subject}/subject), {tokens} scored "
          f"positions, max_length {seed.max_length}, torch threads {torch.get_num_threads()}")
    measure("dense seed, batched", seed, args.batch_size)
    measure("dense seed, one at a time", seed, 1, one_call_each=True)
    experts = sorted(p.parent.name for p in RunDir(run_dir).experts.glob("*/weights"))
    with tempfile.TemporaryDirectory() as tmp:
        moe_path = moe_checkpoint(run_dir, len(experts), Path(tmp))
        moe = NemoBtxLM(str(moe_path), run_dir=str(run_dir), batch_size=args.batch_size)
        measure(f"MoE top-2 ({moe.scorer.model_cfg.moe.num_experts} experts)", moe, args.batch_size)
    btm = BTMLM(run_dir=str(run_dir), top_k=2, batch_size=args.batch_size)
    measure(f"BTM top-2 ({len(experts)} experts)", btm, args.batch_size)
    ratio = rows[f"BTM top-2 ({len(experts)} experts)"]["seconds"] / rows[next(k for k in rows if k.startswith("MoE"))]["seconds"]
    speedup = rows["dense seed, one at a time"]["seconds"] / rows["dense seed, batched"]["seconds"]
    print(f"batching speed-up {speedup:.2f}x; BTM top-2 costs {ratio:.2f}x the MoE top-2 per token")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"requests": len(requests), "tokens": tokens, "rows": rows,
                                               "batching_speedup": speedup, "btm_over_moe": ratio,
                                               "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
