"""A benchmark whose data is not on the machine: skipped with the reason recorded, or (for real
runs, eval.missing_data=error) an error before anything runs."""

import pytest

from nemo_btx.errors import BtxError
from nemo_btx.evaluation import benchmarks


@pytest.fixture
def no_gsm8k(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.delenv(benchmarks.DATA_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_gsm8k_without_data_is_skipped_or_an_error(no_gsm8k):
    tasks = ["btx_gsm8k", "btx_mmlu"]
    assert "no hub and no local copy" in benchmarks.unavailable("btx_gsm8k")
    ok, skipped = benchmarks.runnable(tasks, None, "skip")
    assert ok == ["btx_mmlu"] and list(skipped) == ["btx_gsm8k"]
    with pytest.raises(BtxError, match="eval task btx_gsm8k: GSM8K: no hub"):
        benchmarks.runnable(tasks, None, "error")
    # A local copy makes it available again.
    (no_gsm8k / "data" / "gsm8k").mkdir(parents=True)
    (no_gsm8k / "data" / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    assert benchmarks.unavailable("btx_gsm8k", str(no_gsm8k / "data")) is None
    assert benchmarks.runnable(tasks, str(no_gsm8k / "data"), "error") == (tasks, {})


def test_run_refuses_up_front_for_a_real_run(no_gsm8k, tmp_path):
    from nemo_btx.config import load_config
    from nemo_btx.orchestration import local

    cfg = load_config([f"run.dir={tmp_path / 'run'}", "eval.missing_data=error"])
    with pytest.raises(BtxError, match="btx_gsm8k"):
        local.run(cfg)
    assert not (tmp_path / "run").exists()  # nothing started
