"""A synthetic run directory for the report tests: every file the report reads, in the formats
the stages write them (training loop, mix, routing recorder, eval stage, ledger), with known
numbers and nothing trained, so the tests take seconds and know every expected value.

Not a conftest.py: the suite imports the top-level `conftest` by name.
"""

import json
import math
from pathlib import Path

from nemo_btx.run_dir import RunDir

DOMAINS = ["code", "math", "wiki"]
VERSIONS = {"hydra-core": "1.3.8", "lm-eval": "0.4.13", "megatron-core": "0.16.1", "nemo-btx": "0.1.0",
            "omegaconf": "2.3.1", "python": "3.11.7", "torch": "2.13.0+cpu"}
TOKENS_PER_STEP = 1024
FLOPS_PER_TOKEN = {"dense": 8.0e6, "moe": 1.2e7}

#: Held-out loss per (model, domain). Chosen so that: the code and math experts beat the seed on
#: their domain, the wiki expert does not; BTX beats the seed and the data-matched upcycling on
#: average but not the dense baseline.
LOSS = {
    "seed":            {"code": 5.0, "math": 3.0, "wiki": 6.0},
    "expert-code":     {"code": 4.0, "math": 4.5, "wiki": 6.8},
    "expert-math":     {"code": 6.5, "math": 1.5, "wiki": 7.5},
    "expert-wiki":     {"code": 5.5, "math": 3.5, "wiki": 6.1},
    "btm-top1":        {"code": 4.3, "math": 1.8, "wiki": 6.2},
    "btm-top2":        {"code": 4.2, "math": 1.7, "wiki": 6.0},
    "upcycle-data":    {"code": 4.8, "math": 2.4, "wiki": 5.9},
    "upcycle-compute": {"code": 4.4, "math": 1.9, "wiki": 5.7},
    "dense":           {"code": 4.1, "math": 1.6, "wiki": 5.6},
    "btx":             {"code": 4.2, "math": 1.7, "wiki": 5.8},
}
#: (GSM8K strict, HumanEval pass@1, MMLU group acc) per evaluated model.
SCORES = {
    "seed": (0.02, 0.0, 0.25), "expert-code": (0.01, 0.10, 0.24), "expert-math": (0.20, 0.0, 0.25),
    "expert-wiki": (0.01, 0.0, 0.30), "btm-top1": (0.15, 0.05, 0.27), "btm-top2": (0.16, 0.06, 0.28),
    "upcycle-data": (0.10, 0.04, 0.26), "upcycle-compute": (0.12, 0.05, 0.27),
    "dense": (0.14, 0.06, 0.29), "btx": (0.18, 0.08, 0.29),
}
MMLU_SUBJECTS = {"btx_mmlu_stem": ["btx_mmlu_anatomy", "btx_mmlu_astronomy"],
                 "btx_mmlu_other": ["btx_mmlu_global_facts"]}
DOCS = 40
#: Training documents per domain in the data manifests.
DATA_DOCS = [120, 3400, 75]
TRAIN_DIRS = RunDir(".").training_dirs(["code", "math", "wiki"])
STEPS = {"seed": 40, "expert-code": 20, "expert-math": 20, "expert-wiki": 20, "btx": 20,
         "upcycle-data": 20, "upcycle-compute": 60, "dense": 78}
STAGE_NAMES = {"seed": "seed", "expert-code": "expert:code", "expert-math": "expert:math",
               "expert-wiki": "expert:wiki", "btx": "finetune", "upcycle-data": "baseline:upcycle-data",
               "upcycle-compute": "baseline:upcycle-compute", "dense": "baseline:dense"}
MOE = {"btx", "upcycle-data", "upcycle-compute"}
#: The training manifests' valid_loss differs from the eval stage's loss by this much, so a test
#: can tell which of the two a perplexity came from.
TRAIN_OFFSET = 0.01
#: routing.json: {domain: {layer: shares}} for 2 layers, experts code, math, wiki, seed.
ROUTING = {"code": {"1": [0.5, 0.1, 0.1, 0.3], "2": [0.4, 0.2, 0.1, 0.3]},
           "math": {"1": [0.1, 0.6, 0.1, 0.2], "2": [0.2, 0.5, 0.1, 0.2]},
           "wiki": {"1": [0.2, 0.2, 0.2, 0.4], "2": [0.3, 0.2, 0.2, 0.3]}}


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


CONFIG = """run:
  dir: {run}
model:
  name: tiny
  num_layers: 2
  hidden_size: 64
data:
  domains:
  - name: code
    source: builtin
    weight: 1.0
  - name: math
    source: builtin
    weight: 1.0
  - name: wiki
    source: builtin
    weight: 1.0
finetune:
  train_iters: 20
eval:
  limit: 40
"""


def ledger_lines(run: Path) -> list:
    """What the training loop appends: one line per finished segment, each holding the stage's
    totals so far. The math expert was killed and resumed (two lines; the last counts); the
    seed's line uses a relative `out`."""
    lines = []
    for name, rel in TRAIN_DIRS.items():
        steps = STEPS[name]
        tokens = steps * TOKENS_PER_STEP
        per_token = FLOPS_PER_TOKEN["moe" if name in MOE else "dense"]
        wall = steps * (0.5 if name in MOE else 0.25)
        out = str(run / rel) if name != "seed" else rel
        if name == "expert-math":  # the first segment, before the kill: 12 of 20 steps
            lines.append({"time": "2026-01-01T00:00:00", "stage": STAGE_NAMES[name], "out": out,
                          "steps": [0, 12], "tokens": 12 * TOKENS_PER_STEP,
                          "flops": 12 * TOKENS_PER_STEP * per_token, "wall_s": 3.0, "device_seconds": 3.0,
                          "world_size": 1, "device": "cpu"})
        lines.append({"time": "2026-01-01T00:01:00", "stage": STAGE_NAMES[name], "out": out,
                      "steps": [0, steps], "tokens": tokens, "flops": tokens * per_token,
                      "wall_s": wall, "device_seconds": 2 * wall, "world_size": 2, "device": "cpu",
                      "segment": {"steps": [0, steps], "wall_s": wall}})
    return lines


def _training_stage(run: Path, name: str) -> None:
    out = run / TRAIN_DIRS[name]
    steps = STEPS[name]
    final = {d: v + TRAIN_OFFSET for d, v in LOSS[name].items()}
    records = []
    for step in range(1, steps + 1):
        rec = {"step": step, "loss": 8.0 - 3.0 * step / steps, "lr": 1e-3, "grad_norm": 1.0,
               "tokens": step * TOKENS_PER_STEP, "tokens_per_s": 1000.0}
        if step % 10 == 0 or step == steps:
            rec["valid"] = {d: final[d] + (steps - step) / steps for d in DOMAINS}
        records.append(json.dumps(rec))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("\n".join(records) + "\n{\"step\": 99, \"loss\"")  # cut by a kill
    (out / "config.yaml").write_text(CONFIG.format(run=run))
    _json(out / "manifest.json", {
        "stage": STAGE_NAMES[name], "steps": steps, "tokens_seen": steps * TOKENS_PER_STEP,
        "valid_loss": final, "parent": None, "domains": DOMAINS, "weights": "weights",
        "train_flops_per_token": FLOPS_PER_TOKEN["moe" if name in MOE else "dense"],
        "config": CONFIG.format(run=run), "versions": VERSIONS, "complete": True})


def checkpoints(run: Path, name: str) -> list:
    """What the eval stage records as the model's checkpoint(s) (evaluate.resolve)."""
    if name.startswith("btm-"):
        return [str(run / "experts" / d / "weights") for d in DOMAINS]
    return [str(run / TRAIN_DIRS[name] / "weights")]


def results_json(run: Path, name: str) -> dict:
    """The eval stage's results.json: lm-eval's dict plus the `nemo_btx` section."""
    gsm, he, mmlu = SCORES[name]
    results = {"btx_gsm8k": {"alias": "btx_gsm8k", "exact_match,strict-match": gsm,
                             "exact_match_stderr,strict-match": "N/A",
                             "exact_match,flexible-extract": min(1.0, gsm + 0.05)},
               "btx_humaneval": {"alias": "btx_humaneval", "pass@1,sandbox": he,
                                 "pass@1_stderr,sandbox": "N/A"}}
    n_samples = {"btx_gsm8k": {"original": 1319, "effective": DOCS},
                 "btx_humaneval": {"original": 164, "effective": DOCS}}
    subtasks = {"btx_mmlu": list(MMLU_SUBJECTS)}
    for group, subjects in MMLU_SUBJECTS.items():
        subtasks[group] = subjects
        for s in subjects:
            results[s] = {"alias": s, "acc,none": mmlu, "acc_stderr,none": "N/A"}
            n_samples[s] = {"original": 100, "effective": DOCS}
    groups = {"btx_mmlu": {"alias": "mmlu", "acc,none": mmlu, "acc_stderr,none": "N/A"},
              "btx_mmlu_stem": {"acc,none": mmlu}, "btx_mmlu_other": {"acc,none": mmlu}}
    ppl = {d: {"loss": LOSS[name][d], "perplexity": math.exp(LOSS[name][d]), "tokens": 512}
           for d in DOMAINS}
    return {"results": results, "groups": groups, "group_subtasks": subtasks, "n-samples": n_samples,
            "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {},
            "nemo_btx": {"model": name, "checkpoints": checkpoints(run, name), "perplexity": ppl,
                         "limit": DOCS, "tasks": ["btx_gsm8k", "btx_humaneval", "btx_mmlu"],
                         "seconds": 1.0, "btm": None, "versions": VERSIONS, "complete": True}}


def mix_manifest(run: Path) -> dict:
    sources = [{"name": d, "role": "expert", "path": str(run / "experts" / d / "weights"),
                "domains": [d], "marker": {}} for d in DOMAINS]
    sources.append({"name": "seed", "role": "seed", "path": str(run / "seed" / "weights"),
                    "domains": DOMAINS, "marker": {}})
    return {"complete": True, "router_init": "random", "average_weights": [0.25] * 4,
            "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 176,
                    "experts": [[{"source": s["name"], "start": 0, "length": 176}] for s in sources]},
            "sources": sources, "versions": VERSIONS}


def make_run(root: Path) -> Path:
    """Write a complete synthetic run directory under `root`; return it."""
    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(CONFIG.format(run=run))
    for name in TRAIN_DIRS:
        _training_stage(run, name)
    _json(run / "btx" / "mixed" / "manifest.json", mix_manifest(run))
    _json(run / "btx" / "finetuned" / "routing.json",
          {"domains": DOMAINS, "fractions": ROUTING, "num_experts": 4, "router_topk": 2})
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger_lines(run)))
    for name in SCORES:
        _json(run / "eval" / name / "results.json", results_json(run, name))
    for i, d in enumerate(DOMAINS):  # the data manifests (nemo_btx/data/merge.py)
        _json(RunDir(run).data_manifest(d), {"format": 2, "splits": {
            "train": {"documents": DATA_DOCS[i], "tokens": 1000 * DATA_DOCS[i]},
            "valid": {"documents": 1 + i, "tokens": 1000 * (1 + i)}},
            "bad_records": {"counts": {"invalid_json": i}, "first": []}})
    return run
