"""Evaluate models of a run directory with lm-eval in this process group (run under torchrun):
rank 0 writes {model: {"results", "samples": {task: [(doc_id, resps, metrics), ...]},
"requests_per_rank"}} as JSON.

    torchrun --nproc-per-node 2 dp_eval.py RUN_DIR OUT.json seed,moe,btm-top2 TASK[,TASK] LIMIT

A model may name the layout each replica holds it at: `moe@ep2`, `seed@tp2`, `seed@pp2` (the
models of one run may be at different layouts: megatron's parallel state is laid out anew).
"""

import json
import sys
from pathlib import Path

import torch


def build(run_dir: Path, spec: str):
    from nemo_btx.evaluation.btm import BTMLM
    from nemo_btx.evaluation.lm import NemoBtxLM

    name, _, layout = spec.partition("@")
    sizes = {layout[:2]: int(layout[2:])} if layout else {}
    common = dict(batch_size=3, gen_cap=6, **sizes)  # odd sizes: ranks get batches of other shapes
    if name.startswith("btm"):
        return BTMLM(run_dir=str(run_dir), top_k=int(name[-1]), **common)
    return NemoBtxLM(str(run_dir / name / "weights"), run_dir=str(run_dir), **common)


def count_requests(lm) -> dict:
    """Requests of each type this rank is handed (wraps the LM's methods)."""
    seen = {}
    for kind in ("loglikelihood", "generate_until"):
        def counted(requests, *a, _kind=kind, _fn=getattr(lm, kind), **k):
            seen[_kind] = seen.get(_kind, 0) + len(requests)
            return _fn(requests, *a, **k)
        setattr(lm, kind, counted)
    return seen


def main(run_dir: str, out: str, models: str, tasks: str, limit: str) -> None:
    from nemo_btx.evaluation.runner import run_tasks
    from nemo_btx.runtime.distributed import shutdown

    got = {}
    for name in models.split(","):
        lm = build(Path(run_dir), name)
        seen = count_requests(lm)
        res = run_tasks(lm, tasks.split(","), limit=int(limit), log_samples=True)
        per_rank = lm.gather_object(seen)
        if torch.distributed.get_rank() == 0:
            # resps[0]: lm-eval pads a rank with copies of its last request, whose responses
            # it appends to that request's (the metrics read the first)
            samples = {t: sorted((s["doc_id"], [r[0] for r in s["resps"]], {m: s[m] for m in s["metrics"]})
                                 for s in rows)
                       for t, rows in res.pop("samples").items()}
            got[name] = {"results": res["results"], "samples": samples, "requests_per_rank": per_rank}
    if got:
        Path(out).write_text(json.dumps(got, indent=1))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
