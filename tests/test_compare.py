"""`dojo compare`: the statistics against scipy, ablations on the tiny recipe (in-process and with
--jobs 2 subprocesses), and comparing existing run directories."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from scipy import stats

from torchdojo.compare import (compare_command, flatten, group_runs, higher_is_better, mean_ci, parse_seeds,
                               parse_vary, short_labels, split_values, summarize, verdict,
                               welch_diff_ci)
from torchdojo.errors import DojoError

from conftest import make_tiny_recipe
from helpers import read_metrics

LR_OFF = "phases.settle.optimizer.lr=0"     # phase 2 trains nothing in every variant
BASE, SAME, ZERO, ZERO5 = ("phases.warm.optimizer.lr=0.01, log.every_steps=1",
                           "phases.warm.optimizer.lr=0.01, log.every_steps=5",
                           "phases.warm.optimizer.lr=0.0, log.every_steps=1",
                           "phases.warm.optimizer.lr=0.0, log.every_steps=5")


def invoke(*args):
    return CliRunner().invoke(compare_command, [str(a) for a in args], env={"COLUMNS": "220"},
                              catch_exceptions=False)


# -- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 5, 12])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_mean_ci_is_scipys_t_interval(n, confidence):
    rng = np.random.default_rng(n)
    x = rng.normal(0.8, 0.05, size=n)
    r = mean_ci(x, confidence)
    low, high = stats.t.interval(confidence, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert r["n"] == n
    assert r["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert r["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))


def test_mean_ci_without_spread_or_values():
    assert mean_ci([0.7]) == {"n": 1, "mean": 0.7, "std": None, "ci_low": None, "ci_high": None}
    assert mean_ci([])["mean"] is None
    assert mean_ci([0.5, 0.5, 0.5])["ci_low"] == mean_ci([0.5, 0.5, 0.5])["ci_high"] == 0.5
    with pytest.raises(DojoError, match="confidence"):
        mean_ci([1, 2], confidence=95)


def test_welch_matches_scipy_ttest_ind():
    rng = np.random.default_rng(0)
    agree = 0
    for k in range(300):
        na, nb = rng.integers(2, 9, size=2)
        a = rng.normal(0, rng.uniform(0.1, 3), size=na)
        b = rng.normal(rng.uniform(-2, 2), rng.uniform(0.1, 3), size=nb)
        d = welch_diff_ci(a, b)
        res = stats.ttest_ind(a, b, equal_var=False)
        assert d["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
        assert d["t"] == pytest.approx(res.statistic, rel=1e-9)
        assert d["df"] == pytest.approx(res.df, rel=1e-9)
        assert d["p"] == pytest.approx(res.pvalue, rel=1e-7, abs=1e-15)
        ci = res.confidence_interval(0.95)
        assert (d["ci_low"], d["ci_high"]) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
        assert d["excludes_zero"] == (res.pvalue < 0.05)
        agree += d["excludes_zero"]
    assert 30 < agree < 270            # both outcomes were exercised


def test_welch_degenerate_cases():
    assert welch_diff_ci([1.0], [1.0, 2.0]) is None
    assert welch_diff_ci([1.0, 2.0], [3.0]) is None
    same = welch_diff_ci([0.5, 0.5], [0.5, 0.5, 0.5])
    assert same["diff"] == 0 and not same["excludes_zero"]
    exact = welch_diff_ci([0.6, 0.6], [0.5, 0.5])
    assert exact["excludes_zero"] and exact["ci_low"] == exact["ci_high"] == pytest.approx(0.1)


def test_direction_and_verdict():
    for m in ("test/loss", "test/nll", "test/ece", "test/brier", "test/mse", "test/mae", "test/ensemble/loss"):
        assert not higher_is_better(m)
    for m in ("test/accuracy", "test/f1_macro", "test/r2", "val/recall_min"):
        assert higher_is_better(m)
    up = welch_diff_ci([0.9, 0.91, 0.92], [0.5, 0.52, 0.51])
    assert verdict(up, "test/accuracy") == "better" and verdict(up, "test/loss") == "worse"
    assert verdict(welch_diff_ci([1, 2, 3], [1.5, 2.5, 2]), "test/accuracy") == "no clear difference"
    assert verdict(None, "test/accuracy") == "n/a"


def test_summarize_n1_and_metric_choice():
    groups = [("a", [{"test/accuracy": 0.8, "test/loss": 0.5, "val/accuracy": 0.7}]),
              ("b", [{"test/accuracy": 0.6, "test/loss": float("nan"), "val/accuracy": 0.6}])]
    r = summarize(groups)
    assert r["metrics"] == ["test/accuracy", "test/loss"] and r["main_metric"] == "test/accuracy"
    b = r["variants"][1]["metrics"]
    assert b["test/accuracy"]["verdict"] == "n/a" and b["test/accuracy"]["ci_low"] is None
    assert b["test/loss"]["n"] == 0                      # the NaN is left out
    assert summarize(groups, ["loss", "val/accuracy"])["metrics"] == ["test/loss", "val/accuracy"]
    with pytest.raises(DojoError, match="did you mean 'test/accuracy'"):
        summarize(groups, ["test/acuracy"])


def test_parsing_helpers():
    assert split_values("[16,16],[32],{a: 1, b: 2},'x,y'") == ["[16,16]", "[32]", "{a: 1, b: 2}", "'x,y'"]
    assert parse_vary("model.hidden=[16, 16],[32]") == ("model.hidden", ["[16, 16]", "[32]"])
    with pytest.raises(DojoError, match="listed twice"):
        parse_vary("phases.0.optimizer.lr=0.01,0.010")
    with pytest.raises(DojoError, match="--seeds"):
        parse_vary("seed=1,2")
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,5,7") == [0, 5, 7]
    for bad in ("0", "x", "1,1"):
        with pytest.raises(DojoError):
            parse_seeds(bad)
    assert flatten({"a": {"b": [1, {"c": 2}]}, "d": []}) == {"a.b.0": 1, "a.b.1.c": 2, "d": []}
    assert short_labels([[("phases.warm.optimizer.lr", "0.1"), ("phases.settle.optimizer.lr", "0")],
                         [("phases.warm.optimizer.lr", "0.2"), ("phases.settle.optimizer.lr", "0")]]) == [
        "warm.optimizer.lr=0.1, settle.optimizer.lr=0", "warm.optimizer.lr=0.2, settle.optimizer.lr=0"]
    assert short_labels([[("methods.1.decay", "0.9")], [("methods.1.decay", "0.99")]])[0] == "methods.1.decay=0.9"


# -- ablations on the tiny recipe -----------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(make_tiny_recipe(), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ablation(recipe_file, tmp_path_factory):
    """lr 0.01 (baseline) vs lr 0 in the first phase (the second trains nothing in both), crossed with a
    logging interval that changes nothing: 4 variants x 3 seeds, in-process."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    res = invoke(recipe_file, "--vary", "phases.warm.optimizer.lr=0.01,0.0", "--vary", "log.every_steps=1,5",
                 "--seeds", "3", LR_OFF, "--out", out)
    assert res.exit_code == 0, res.output
    return out, res, json.loads((out / "compare.json").read_text())


def _variant(doc, label):
    return next(v for v in doc["variants"] if v["label"] == label)


def test_compare_flags_the_worse_variant_only(ablation):
    out, res, doc = ablation
    assert doc["baseline"] == BASE and [v["label"] for v in doc["variants"]] == [BASE, SAME, ZERO, ZERO5]
    assert doc["main_metric"] == "test/accuracy"
    assert all(m.startswith("test/") for m in doc["metrics"]) and "test/loss" in doc["metrics"]
    assert "test/recall_min" in doc["metrics"] and "test/recall/0" not in doc["metrics"]
    for label in (ZERO, ZERO5):
        acc = _variant(doc, label)["metrics"]["test/accuracy"]
        assert acc["verdict"] == "worse" and acc["diff"]["ci_high"] < 0
        assert _variant(doc, label)["metrics"]["test/loss"]["verdict"] == "worse"    # lower is better
    same = _variant(doc, SAME)["metrics"]["test/accuracy"]
    assert same["verdict"] == "no clear difference"
    assert same["values"] == _variant(doc, BASE)["metrics"]["test/accuracy"]["values"]
    assert same["diff"]["diff"] == 0 and same["diff"]["ci_low"] < 0 < same["diff"]["ci_high"]
    assert "worse" in res.output and "test/accuracy" in res.output


def test_lr_zero_trains_nothing(ablation):
    out, _, doc = ablation
    run = out / _variant(doc, ZERO)["dir"] / "seed0"
    val = [e["val/loss"] for e in read_metrics(run) if "val/loss" in e]
    assert len(val) >= 3 and len(set(val)) == 1          # the model never changed
    base = out / _variant(doc, BASE)["dir"] / "seed0"
    assert len({e["val/loss"] for e in read_metrics(base) if "val/loss" in e}) > 1


def test_compare_numbers_and_files(ablation):
    out, _, doc = ablation
    for v in doc["variants"]:
        assert [r["seed"] for r in v["run_dirs"]] == [0, 1, 2]
        for run in v["run_dirs"]:
            assert run["run_dir"].endswith(f"{v['dir']}/seed{run['seed']}")
            recipe = yaml.safe_load((out / v["dir"] / f"seed{run['seed']}" / "recipe.yaml").read_text())
            assert recipe["seed"] == run["seed"] and recipe["phases"][1]["optimizer"]["lr"] == 0
        summaries = [json.loads((out / v["dir"] / f"seed{s}" / "summary.json").read_text()) for s in range(3)]
        for name in doc["metrics"]:
            e = v["metrics"][name]
            assert e["values"] == [s["metrics"][name] for s in summaries]
            expect = mean_ci(e["values"])
            assert (e["mean"], e["std"], e["ci_low"], e["ci_high"], e["n"]) == \
                (expect["mean"], expect["std"], expect["ci_low"], expect["ci_high"], 3)
    md = (out / "compare.md").read_text()
    assert "## test/accuracy (higher is better)" in md and "## test/loss (lower is better)" in md
    assert "`optimizer.lr=0.0, log.every_steps=1`" in md and "**worse**" in md     # short labels
    assert "--vary log.every_steps=1,5" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_finished_runs_and_resumes_unfinished(ablation, recipe_file, tmp_path):
    out, _, doc = ablation
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    (copy / _variant(doc, SAME)["dir"] / "seed1" / "summary.json").unlink()    # as if killed at the end
    res = invoke(recipe_file, "--vary", "phases.warm.optimizer.lr=0.01,0.0", "--vary", "log.every_steps=1,5",
                 "--seeds", "3", LR_OFF, "--out", copy, "--metric", "accuracy")
    assert res.exit_code == 0, res.output
    assert "11 to reuse" in res.output and "1 to resume" in res.output
    again = json.loads((copy / "compare.json").read_text())
    for label in (BASE, SAME, ZERO):
        assert _variant(again, label)["metrics"]["test/accuracy"] == _variant(doc, label)["metrics"]["test/accuracy"]


def test_validation_fails_before_any_training(recipe_file, tmp_path):
    res = invoke(recipe_file, "--vary", "phases.warm.optimizer.name=adamw,adamx", "--seeds", "2",
                 "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "variant phases.warm.optimizer.name=adamx" in res.output and "did you mean" in res.output
    assert not (tmp_path / "o").exists()
    res = invoke(recipe_file, "--vary", "phases.warm.optimizer.lrr=0.1,0.2", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "lrr" in res.output and not (tmp_path / "o").exists()
    for args, msg in ((["seed=3"], "--seeds"), (["--vary", "log.every_steps=1,2", "log.every_steps=3"], "both"),
                      (["--vary", "x=1", "--vary", "x=2"], "twice"), (["nonsense"], "key.path=value")):
        res = invoke(recipe_file, *args, "--out", tmp_path / "o")
        assert res.exit_code == 2 and msg in res.output, res.output


def test_single_seed_shows_na(recipe_file, tmp_path):
    res = invoke(recipe_file, "--vary", "phases.warm.optimizer.lr=0.01,0.02", "--seeds", "1", "--out",
                 tmp_path / "o", "--metric", "accuracy", "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "compare.json").read_text())
    e = doc["variants"][1]["metrics"]["test/accuracy"]
    assert e["n"] == 1 and e["std"] is None and e["verdict"] == "n/a"
    assert "n/a" in res.output and "[1/2]" not in res.output        # -q: no progress lines


def test_jobs_2_matches_jobs_1_and_reports_a_failing_run(recipe_file, tmp_path):
    """Two parallel `dojo train` subprocesses give the in-process numbers; a run that fails (non-finite
    loss at lr 1e30) is reported with its error and exit code 1, and the comparison still happens."""
    args = ["--vary", "phases.warm.optimizer.lr=0.01,1.0e+30", "--seeds", "0,1", "--metric", "accuracy"]
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        res = invoke(recipe_file, *args, "--jobs", jobs, "--out", out)
        assert res.exit_code == 1, res.output
        assert "2 run(s) did not finish" in res.output and "non-finite" in res.output
        doc = json.loads((out / "compare.json").read_text())
        bad = doc["variants"][1]
        assert [r["status"] for r in bad["run_dirs"]] == ["failed", "failed"]
        assert bad["metrics"]["test/accuracy"]["n"] == 0
        assert json.loads((out / bad["dir"] / "seed0" / "summary.json").read_text())["status"] == "failed"
        results[jobs] = doc["variants"][0]["metrics"]["test/accuracy"]
    assert results[1]["n"] == 2 and results[1] == results[2]


# -- existing runs --------------------------------------------------------------------------------

def test_compare_existing_runs_groups_seeds(ablation, tmp_path):
    out, _, doc = ablation
    res = invoke(out, "--metric", "accuracy", "--out", tmp_path / "again")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "compare.json").read_text())
    # Labelled by the keys that differ between the groups, baseline first (compare.json's order).
    assert [v["label"] for v in again["variants"]] == [
        "phases.0.optimizer.lr=0.01, log.every_steps=1", "phases.0.optimizer.lr=0.01, log.every_steps=5",
        "phases.0.optimizer.lr=0.0, log.every_steps=1", "phases.0.optimizer.lr=0.0, log.every_steps=5"]
    assert again["variants"][3]["short_label"] == "optimizer.lr=0.0, log.every_steps=5"
    for v, w in zip(again["variants"], doc["variants"]):
        assert v["metrics"]["test/accuracy"] == w["metrics"]["test/accuracy"]
        assert len(v["run_dirs"]) == 3
    assert (tmp_path / "again" / "compare.png").exists()


def test_compare_single_run_dirs_and_baseline_choice(ablation, tmp_path):
    out, _, doc = ablation
    runs = [out / _variant(doc, label)["dir"] / f"seed{s}" for label in (ZERO, BASE) for s in range(3)]
    groups, notes = group_runs(runs)
    assert [len(g.runs) for g in groups] == [3, 3] and not notes
    assert [g.label for g in groups] == ["phases.0.optimizer.lr=0.0", "phases.0.optimizer.lr=0.01"]
    res = invoke(*runs, "--metric", "accuracy")              # baseline: the first group, lr 0.0
    assert res.exit_code == 0, res.output
    assert "better │" in res.output and "worse │" not in res.output       # the verdict column
    res = invoke(*runs, "--baseline", "lr=0.01", "--metric", "accuracy")
    assert res.exit_code == 0, res.output
    assert "worse │" in res.output and "better │" not in res.output
    assert not list(tmp_path.iterdir())                      # no --out: printed only


def test_compare_existing_errors(ablation, tmp_path):
    out, _, _ = ablation
    (tmp_path / "empty").mkdir()
    res = invoke(tmp_path / "empty")
    assert res.exit_code == 2 and "no finished runs" in res.output
    res = invoke(out, tmp_path / "missing")
    assert res.exit_code == 2 and "not a directory" in res.output
    res = invoke(out, "--vary", "seed=1")
    assert res.exit_code == 2 and "--vary needs a RECIPE" in res.output
    res = invoke(out, "--baseline", "nothing-like-this")
    assert res.exit_code == 2 and "matches no variant" in res.output
