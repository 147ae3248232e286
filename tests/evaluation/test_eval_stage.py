"""`nemo-btx eval` (stages/evaluate.py): results.json in lm-eval's schema plus perplexities,
perplexity equal to the training loop's validation loss, BTM by name, skip when complete."""

import json
import math

import pytest

from eval_fixtures import SMALL, eval_run  # noqa: F401 - fixture
from nemo_btx.config import load_config
from nemo_btx.stages import evaluate


def config(run_dir, *extra):
    return load_config([f"run.dir={run_dir}", *SMALL, *extra])


@pytest.mark.timeout(600)
def test_eval_stage_writes_results_and_skips_when_complete(eval_run):  # noqa: F811
    cfg = config(eval_run, "eval.model=seed", "eval.tasks=[btx_mmlu_anatomy]", "eval.limit=3")
    assert {"seed", "expert-code", "expert-math", "expert-wiki", "btm-top1", "btm-top2"} <= set(evaluate.available(cfg))
    evaluate.run(cfg)
    out = eval_run / "eval" / "seed" / "results.json"
    res = json.loads(out.read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "nemo_btx"):
        assert key in res, key
    assert res["results"]["btx_mmlu_anatomy"]["sample_len"] == 3
    ppl = res["nemo_btx"]["perplexity"]
    valid = json.loads((eval_run / "seed" / "manifest.json").read_text())["valid_loss"]
    for domain, loss in valid.items():
        assert ppl[domain]["loss"] == pytest.approx(loss, abs=1e-4), domain
        assert ppl[domain]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    stamp = out.stat().st_mtime_ns
    evaluate.run(cfg)
    assert out.stat().st_mtime_ns == stamp


@pytest.mark.timeout(600)
def test_eval_stage_btm_by_name(eval_run):  # noqa: F811
    cfg = config(eval_run, "eval.model=btm-top1", "eval.tasks=[]")
    evaluate.run(cfg)
    res = json.loads((eval_run / "eval" / "btm-top1" / "results.json").read_text())
    assert res["nemo_btx"]["checkpoints"] == [str(eval_run / "experts" / d / "weights") for d in ("code", "math", "wiki")]
    assert set(res["nemo_btx"]["perplexity"]) == {"code", "math", "wiki"}
    with pytest.raises(Exception, match="eval.model"):
        evaluate.checkpoints_of(config(eval_run), "no-such-model")
