"""`nemo-btx eval` (stages/evaluate.py): results.json in lm-eval's schema plus perplexities,
perplexity equal to the training loop's validation loss, BTM by name, skip when complete."""

import json
import math

import pytest

from eval_fixtures import SMALL, eval_run  # noqa: F401 - fixture

pytestmark = pytest.mark.slow  # every test reads eval_run, a trained run (~30 s)
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


@pytest.mark.timeout(600)
def test_results_are_keyed_by_checkpoint_not_directory_name(eval_run, tmp_path):  # noqa: F811
    """Two different checkpoints in directories of the same name get their own results; a
    results.json of another checkpoint is never reused."""
    import shutil

    from nemo_btx.run_dir import RunDir, checkpoint_identity

    a, b = tmp_path / "a" / "same" / "weights", tmp_path / "b" / "same" / "weights"
    shutil.copytree(eval_run / "seed" / "weights", a)
    shutil.copytree(eval_run / "experts" / "code" / "weights", b)
    outs = []
    for ckpt in (a, b):
        cfg = config(eval_run, f"eval.model={ckpt}", "eval.tasks=[]")
        evaluate.run(cfg)
        out = RunDir(eval_run).eval_dir_for_checkpoint(ckpt, checkpoint_identity(ckpt)) / "results.json"
        res = json.loads(out.read_text())
        assert res["nemo_btx"]["identity"] == checkpoint_identity(ckpt)
        assert res["nemo_btx"]["checkpoints"] == [str(ckpt)]
        outs.append((out, res["nemo_btx"]["perplexity"]))
    assert outs[0][0] != outs[1][0]
    assert outs[0][1] != outs[1][1]  # the seed and the code expert score differently
    # The seed's copy scores what the seed scores (the same weights, the same identity).
    assert checkpoint_identity(a) == checkpoint_identity(eval_run / "seed" / "weights")
    # Evaluated again: skipped (same identity), the file untouched.
    stamp = outs[0][0].stat().st_mtime_ns
    evaluate.run(config(eval_run, f"eval.model={a}", "eval.tasks=[]"))
    assert outs[0][0].stat().st_mtime_ns == stamp
    # A run model whose results are of another checkpoint (retrained since) is evaluated again.
    cfg = config(eval_run, "eval.model=expert-math", "eval.tasks=[]")
    evaluate.run(cfg)
    out = eval_run / "eval" / "expert-math" / "results.json"
    assert evaluate.is_current(cfg, "expert-math")
    stale = json.loads(out.read_text())
    stale["nemo_btx"]["identity"] = "an-older-checkpoint"
    out.write_text(json.dumps(stale))
    assert not evaluate.is_current(cfg, "expert-math")
    evaluate.run(cfg)
    assert json.loads(out.read_text())["nemo_btx"]["identity"] == checkpoint_identity(
        eval_run / "experts" / "math" / "weights")
    assert evaluate.is_current(cfg, "expert-math")
