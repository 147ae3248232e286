#!/usr/bin/env python
"""Evaluation throughput: batched vs one-at-a-time MMLU loglikelihood, BTM top-2 vs an MoE
top-2 per token on the same requests, 1 vs 2 data-parallel ranks, and our greedy generation vs
transformers' `generate` on the same MoE.

Sections (`--sections`, default all):

batching, btm:

The requests are the real ones lm-eval builds for btx_mmlu (5-shot prompts, 4 choices each),
recorded once and replayed against each model, so every side scores exactly the same tokens:

1. the seed (dense) with `--batch-size` requests per forward pass vs batch size 1;
"One at a time" sends each request alone (no batching, and the 4 choices of a question do not
share their context's forward pass, which batched scoring does).

2. `nemo-btx-btm` top-2 over the run's experts (every expert runs on every token) vs an MoE
   top-2 of the same expert size (`<run>/btx/mixed/weights` if the mix stage ran, else a random
   MoE with one expert per domain built with `build_model`: cost does not depend on weights).

Reported: requests/s, scored tokens/s and ms per 1k tokens, with the best of `--repeats` runs.

ranks: the whole lm-eval path (`run_tasks`) on the seed under torchrun with 1 and then 2
   data-parallel processes on this machine's cores (1 process: every core's threads; 2
   processes: torchrun's one thread each): btx_mmlu (loglikelihood, `--per-subject` documents
   per subject) and a generation task (btx_gsm8k where its data is here, else btx_humaneval;
   `--gen-docs` documents, `--gen-tokens` tokens at most). Reported: requests/s end to end
   (lm-eval's task building, which every rank repeats, included; model loading excluded) and
   in the model (time inside the LM's calls, the slowest rank), generated tokens/s, and the
   speed-up of 2 ranks over the faster of the one-process runs.

hf: the MoE (as above) exported with `nemo-btx export-hf`, greedy generation of `--hf-batch`
   prompts of `--hf-prompt` tokens (text from the run's validation data), `--gen-tokens` new
   tokens each: our `generate_ids` vs `MixtralForCausalLM.generate` (same threads, same batch,
   no padding, the two sides' repeats alternating); tokens/s, ms per decoding step and whether
   every token agrees.

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


# ----------------------------------------------------------------------------- data-parallel ranks


def ranks_worker(args) -> None:
    """One torchrun process of the `ranks` section: evaluate, then rank 0 writes the figures."""
    from nemo_btx.evaluation.benchmarks import unavailable
    from nemo_btx.evaluation.lm import NemoBtxLM
    from nemo_btx.evaluation.runner import run_tasks
    from nemo_btx.run_dir import RunDir
    from nemo_btx.runtime.distributed import shutdown

    run_dir = Path(args.run_dir)
    lm = NemoBtxLM(str(run_dir / RunDir(run_dir).model("seed", []).checkpoints[0]),
                   batch_size=args.batch_size, gen_cap=args.gen_tokens)
    counts = {"loglikelihood": 0, "generate_until": 0, "generated_tokens": 0, "model_seconds": 0.0}
    loglikelihood, generate_until = lm.loglikelihood, lm.generate_until

    def count_ll(requests, *a, **k):
        start = time.perf_counter()
        out = loglikelihood(requests, *a, **k)
        counts["model_seconds"] += time.perf_counter() - start
        counts["loglikelihood"] += len(requests)
        return out

    def count_gen(requests, *a, **k):
        start = time.perf_counter()
        out = generate_until(requests, *a, **k)
        counts["model_seconds"] += time.perf_counter() - start
        counts["generate_until"] += len(requests)
        counts["generated_tokens"] += sum(len(lm.tok.encode(t)) for t in out)
        return out

    lm.loglikelihood, lm.generate_until = count_ll, count_gen
    gen_task = "btx_gsm8k" if unavailable("btx_gsm8k") is None else "btx_humaneval"
    figures = {"generation_task": gen_task}
    for label, tasks, limit in (("loglikelihood", ["btx_mmlu"], args.per_subject),
                                ("generation", [gen_task], args.gen_docs)):
        run_tasks(lm, tasks, limit=1)  # warm-up: datasets cached, first forward passes done
        for k in counts:
            counts[k] = 0
        lm.barrier()
        start = time.perf_counter()
        run_tasks(lm, tasks, limit=limit)
        lm.barrier()
        seconds = time.perf_counter() - start
        per_rank = lm.gather_object(dict(counts))
        if lm.rank == 0:
            # lm-eval pads the ranks to equal counts with copies: count each rank's real share
            # as the one-process total (the first row of a 1-rank run) would
            figures[label] = {"seconds": seconds, "per_rank": per_rank}
    if lm.rank == 0:
        figures["threads"] = __import__("torch").get_num_threads()
        Path(args.ranks_worker).write_text(json.dumps(figures))
    shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_ranks(args) -> dict:
    import subprocess

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # (processes, threads each): one process on every core, one on one core, and two
        # ranks of one thread (torchrun's default), which is what the speed-up compares
        for key, n, threads in (("1", 1, os.cpu_count()), ("1x1", 1, 1), ("2", 2, 1)):
            path = Path(tmp) / f"{key}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
                   "--ranks-worker", str(path), "--run-dir", args.run_dir, "--batch-size", str(args.batch_size),
                   "--per-subject", str(args.per_subject), "--gen-docs", str(args.gen_docs),
                   "--gen-tokens", str(args.gen_tokens)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            out[key] = json.loads(path.read_text())
    rows = {}
    for kind, unit in (("loglikelihood", "loglikelihood"), ("generation", "generate_until")):
        total = out["1"][kind]["per_rank"][0][unit]  # the requests one process scores
        tokens = out["1"][kind]["per_rank"][0]["generated_tokens"]
        for n, label in (("1", "1 rank"), ("1x1", "1 rank, 1 thread"), ("2", "2 ranks")):
            t = out[n][kind]["seconds"]
            model = max(r["model_seconds"] for r in out[n][kind]["per_rank"])  # the slowest rank
            rows[f"{kind}, {label}"] = {
                "seconds": t, "model_seconds": model, "requests": total, "requests_per_s": total / t,
                "model_requests_per_s": total / model,
                "generated_tokens_per_s": tokens / model if tokens else None, "threads_per_rank": out[n]["threads"]}
        # against the faster one-process configuration (threads help or hurt with the load)
        ones, two = [rows[f"{kind}, 1 rank"], rows[f"{kind}, 1 rank, 1 thread"]], rows[f"{kind}, 2 ranks"]
        rows[f"{kind} speed-up"] = {"end_to_end": min(o["seconds"] for o in ones) / two["seconds"],
                                    "model": min(o["model_seconds"] for o in ones) / two["model_seconds"]}
    print(f"\ndata-parallel ranks (whole lm-eval path; generation task {out['1']['generation_task']}, "
          f"{args.gen_tokens} tokens at most)")
    print(f"{'':<32} {'requests':>8} {'end to end':>18} {'in the model':>18} {'generated':>12}")
    for label, r in rows.items():
        if "model" in r and "end_to_end" in r:
            print(f"{label:<32} {'':>8} {r['end_to_end']:17.2f}x {r['model']:17.2f}x")
            continue
        gen = f"{r['generated_tokens_per_s']:8.1f} tok/s" if r["generated_tokens_per_s"] else ""
        print(f"{label:<32} {r['requests']:8d} {r['requests_per_s']:12.1f} req/s {r['model_requests_per_s']:12.1f} req/s "
              f"{gen:>12}  ({r['threads_per_rank']} thread(s)/rank)")
    return rows


# ------------------------------------------------------------------------ ours vs transformers


def measure_hf(args, moe_path: Path) -> dict:
    """Our greedy generation vs transformers' generate on the exported MoE, same prompts."""
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM

    from nemo_btx.data.loader import validation_batches
    from nemo_btx.evaluation.lm import NemoBtxLM
    from nemo_btx.config import load_config

    run_dir = Path(args.run_dir)
    lm = NemoBtxLM(str(moe_path), run_dir=str(run_dir))
    cfg = load_config([f"run.dir={run_dir}"])
    cfg.model = lm.scorer.model_cfg
    domain = sorted(p.parent.name for p in RunDirExperts(run_dir))[0]
    rows = [r for b in validation_batches(cfg, run_dir, domain, 4) for r in b.tolist()]
    prompts = [r[: args.hf_prompt] for r in rows[: args.hf_batch]]
    if len(prompts) < args.hf_batch:
        raise SystemExit(f"only {len(prompts)} validation rows for {args.hf_batch} prompts")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf"
        subprocess.run([sys.executable, "-m", "nemo_btx.cli", "export-hf", f"run.dir={run_dir}",
                        f"hf.path={moe_path}", f"hf.out={out}"], check=True, capture_output=True)
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    n = args.gen_tokens
    lm.gen_batch_size = len(prompts)

    def ours():
        return lm.generate_ids(prompts, [], n)

    ids = torch.tensor(prompts)

    def theirs():
        with torch.inference_mode():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=0, eos_token_id=lm.eod_id, pad_token_id=lm.eod_id)
        out = []
        for row in g[:, ids.shape[1]:].tolist():  # up to (not including) end-of-document
            out.append(row[: row.index(lm.eod_id)] if lm.eod_id in row else row)
        return out

    sides = (("ours (megatron-core, KV cache)", ours), ("transformers generate", theirs))
    best, got = {}, {}
    for label, fn in sides:
        fn()  # warm-up
    # the two sides alternate, so that load from other work on the machine hits both alike
    for _ in range(args.repeats):
        for label, fn in sides:
            start = time.perf_counter()
            got[label] = fn()
            t = time.perf_counter() - start
            best[label] = min(best.get(label, t), t)
    result = {}
    for label, _ in sides:
        tokens = sum(len(g) for g in got[label])
        result[label] = {"seconds": best[label], "tokens": tokens, "tokens_per_s": tokens / best[label],
                         "ms_per_step": 1000 * best[label] / n, "ids": got[label]}
    a, b = (result[k].pop("ids") for k in list(result))
    same = sum(x == y for x, y in zip(a, b))
    ratio = result["ours (megatron-core, KV cache)"]["tokens_per_s"] / result["transformers generate"]["tokens_per_s"]
    print(f"\ngreedy generation on the MoE ({lm.scorer.model_cfg.moe.num_experts} experts top-"
          f"{lm.scorer.model_cfg.moe.router_topk}), {len(prompts)} prompts x {args.hf_prompt} tokens, "
          f"{n} new tokens each, threads {torch.get_num_threads()}")
    for label, r in result.items():
        print(f"{label:<32} {r['tokens']:6d} tokens in {r['seconds']:6.2f} s  {r['tokens_per_s']:8.1f} tok/s  "
              f"{r['ms_per_step']:6.2f} ms/step")
    print(f"ours / transformers: {ratio:.2f}x; identical outputs for {same}/{len(prompts)} prompts")
    return {"rows": result, "ours_over_hf": ratio, "identical_prompts": same, "prompts": len(prompts)}


def RunDirExperts(run_dir: Path):
    from nemo_btx.run_dir import RunDir

    return RunDir(run_dir).experts.glob("*/weights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/tiny")
    ap.add_argument("--per-subject", type=int, default=2, help="MMLU questions per subject")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", default="batching,ranks,hf", help="comma-separated: batching,ranks,hf")
    ap.add_argument("--gen-docs", type=int, default=8, help="ranks: documents of the generation task")
    ap.add_argument("--gen-tokens", type=int, default=32, help="ranks, hf: new tokens at most")
    ap.add_argument("--hf-batch", type=int, default=8, help="hf: prompts generated together")
    ap.add_argument("--hf-prompt", type=int, default=32, help="hf: tokens per prompt")
    ap.add_argument("--ranks-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ranks_worker:
        return ranks_worker(args)
    sections = set(args.sections.split(","))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from nemo_btx.run_dir import RunDir

    run_dir = Path(args.run_dir)
    report = {"threads": torch.get_num_threads()}
    experts = sorted(p.parent.name for p in RunDir(run_dir).experts.glob("*/weights"))
    with tempfile.TemporaryDirectory() as tmp:
        moe_path = moe_checkpoint(run_dir, len(experts), Path(tmp))
        if "batching" in sections:
            report["batching"] = measure_batching(args, run_dir, moe_path, experts)
        if "ranks" in sections:
            report["ranks"] = measure_ranks(args)
        if "hf" in sections:
            report["hf"] = measure_hf(args, moe_path)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


def measure_batching(args, run_dir: Path, moe_path: Path, experts) -> dict:
    import torch

    from nemo_btx.evaluation.btm import BTMLM
    from nemo_btx.evaluation.lm import NemoBtxLM
    from nemo_btx.run_dir import RunDir

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
    moe = NemoBtxLM(str(moe_path), run_dir=str(run_dir), batch_size=args.batch_size)
    measure(f"MoE top-2 ({moe.scorer.model_cfg.moe.num_experts} experts)", moe, args.batch_size)
    btm = BTMLM(run_dir=str(run_dir), top_k=2, batch_size=args.batch_size)
    measure(f"BTM top-2 ({len(experts)} experts)", btm, args.batch_size)
    ratio = rows[f"BTM top-2 ({len(experts)} experts)"]["seconds"] / rows[next(k for k in rows if k.startswith("MoE"))]["seconds"]
    speedup = rows["dense seed, one at a time"]["seconds"] / rows["dense seed, batched"]["seconds"]
    print(f"batching speed-up {speedup:.2f}x; BTM top-2 costs {ratio:.2f}x the MoE top-2 per token")
    return {"requests": len(requests), "tokens": tokens, "rows": rows, "batching_speedup": speedup,
            "btm_over_moe": ratio}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
