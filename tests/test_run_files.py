"""Damaged run files (summary.json, metrics.jsonl, data_info.json, recipe.yaml, calibration.json,
compare.json): every command that reads them says what is wrong in one line naming the file (and the
line of metrics.jsonl), exit code 2, never a traceback; `dojo runs` still lists the run; `dojo resume`
repairs metrics.jsonl from the lines that parse."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from torchdojo.cli import main
from torchdojo.errors import DojoError
from torchdojo.log import MetricsFile
from torchdojo.runfiles import read_json_object, read_metrics, read_metrics_tolerant, read_summary

from conftest import make_tiny_recipe
from helpers import comparable, fit

DEEP = "[" * 100_000            # parses to nothing: json recurses once per level and overflows the stack
RESUME_STEP = 10                # the checkpoint an unfinished copy resumes from


def dojo(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_one_line_error(res, *names: str) -> str:
    """Exit code 2 and a single `error:` line on stderr that contains every one of `names`."""
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with a checkpoint every 5 steps, all kept (one second of training)."""
    recipe = make_tiny_recipe()
    recipe["checkpoint"] = {"every_steps": 5, "keep_last": 100}
    recipe["log"]["tensorboard"] = False
    run_dir = tmp_path_factory.mktemp("runfiles") / "run"
    fit(recipe, run_dir)
    return run_dir


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the finished run, for one test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def unfinished(run) -> Path:
    """The copy as if killed after the checkpoint at RESUME_STEP: no summary, no final model, no later
    checkpoints, and metrics.jsonl with every line of the whole run (the lines past the checkpoint are
    logged again on resume)."""
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "final")
    for ck in (run / "checkpoints").glob("step-*"):
        if int(ck.name.split("-")[1]) > RESUME_STEP:
            shutil.rmtree(ck)
    return run


def metrics_lines(run: Path) -> list[bytes]:
    return (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)


# -- the readers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, why", [
    (b"", "invalid JSON"),
    (DEEP.encode(), "nested too deeply"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b"[]", "found a list"),
    (b'"metrics"', "found a string"),
])
def test_read_json_object_names_the_file(tmp_path, content, why):
    path = tmp_path / "summary.json"
    path.write_bytes(content)
    with pytest.raises(DojoError, match=why) as err:
        read_json_object(path)
    assert str(err.value).startswith(f"{path}: ")


def test_read_json_object_missing_file(tmp_path):
    with pytest.raises(DojoError, match="cannot be read"):
        read_json_object(tmp_path / "summary.json")


@pytest.mark.parametrize("metrics, why", [('"x"', 'found a string'), ('{"test/accuracy": "high"}', 'a string'),
                                          ('{"test/accuracy": [1]}', "a list"), ('{"test/loss": true}', "a boolean")])
def test_read_summary_wants_numeric_metrics(tmp_path, metrics, why):
    path = tmp_path / "summary.json"
    path.write_text(f'{{"status": "finished", "metrics": {metrics}}}')
    with pytest.raises(DojoError, match=why):
        read_summary(path)


def test_read_summary_accepts_undefined_metrics(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"metrics": {"test/accuracy": 0.5, "test/f1": null, "test/loss": NaN}}')
    assert read_summary(path)["metrics"]["test/accuracy"] == 0.5


def test_read_metrics_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2, "x": "\xff"}\n[3]\n{"step": 4}\n')
    with pytest.raises(DojoError, match=r"metrics.jsonl, line 3: not UTF-8 .*\(and 1 more line"):
        read_metrics(path)
    assert read_metrics(path, strict=False) == [{"step": 1}, {"step": 4}]
    assert read_metrics_tolerant(path) == ([{"step": 1}, {"step": 4}], 2)
    path.write_text('{"step": 1}\n[2]\n')
    with pytest.raises(DojoError, match="line 2: expected a JSON object, found a list"):
        read_metrics(path)


def test_read_metrics_leaves_out_an_unfinished_last_line(tmp_path):
    """A run writing its next line (or killed while writing it) is not damage; the same text followed by
    a newline, or with lines after it, is."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "train/lo')
    assert read_metrics(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"step": 2, "train/lo\n')
    with pytest.raises(DojoError, match="line 2"):
        read_metrics(path)


def test_metrics_file_completes_a_last_line_without_newline(tmp_path):
    """Appending right after a last line that lost only its newline would glue two lines together."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing was dropped: no warning
        run = MetricsFile(path, keep_lines=2)
    run.write({"step": 3})
    run.close()
    assert read_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_metrics_file_drops_damaged_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": 2}\n{"step": 3, "train/lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 2 line\(s\) that do not parse \(line 2: not UTF-8"):
        run = MetricsFile(path, keep_lines=1)
    assert (run.dropped, run.lines) == (2, 1)
    run.write({"step": 2})
    run.close()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# -- report ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, names", [
    ('{"status": "finished", "metrics": "x"}', ("summary.json", '"metrics"')),
    ('{"status": "finished", "metrics": {"test/accuracy": "high"}}', ("summary.json", "test/accuracy")),
    (DEEP, ("summary.json", "nested too deeply")),
    ("[]", ("summary.json", "found a list")),
])
def test_report_damaged_summary(run, damage, names):
    (run / "summary.json").write_text(damage)
    assert_one_line_error(dojo("report", "-q", run), str(run / "summary.json"), *names[1:])
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("line, why", [(b"garbage\n", "invalid JSON"), (b'{"step": 3, "x": "\xff"}\n', "not UTF-8"),
                                       (b"[1, 2]\n", "found a list"), (b'{"step": ' + DEEP.encode() + b"\n", "nested")])
def test_report_damaged_metrics_line(run, line, why):
    lines = metrics_lines(run)
    lines.insert(4, line)
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    assert_one_line_error(dojo("report", "-q", run), f"{run / 'metrics.jsonl'}, line 5: ", why)


def test_report_torn_last_line_is_a_note(run):
    """What a run still writing, or killed mid-line, leaves: the report shows the rest."""
    lines = metrics_lines(run)
    (run / "metrics.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:20])
    res = dojo("report", run)
    assert res.exit_code == 0, res.stderr
    assert "1 unreadable line(s) skipped" in res.stderr


def test_report_damaged_data_info_is_a_note(run):
    """The report still draws the curves; the test-split plots, which need the model, are left out
    with a note naming the file (an AttributeError traceback before)."""
    (run / "data_info.json").write_text("[]")
    res = dojo("report", run)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 0, res.stderr
    assert "no test-split plots" in res.stderr and "data_info.json" in res.stderr
    assert "found a list" in res.stderr


# -- compare (existing runs) ----------------------------------------------------------------------

@pytest.mark.parametrize("summary, names", [
    ({"status": "finished", "metrics": "x"}, ('"metrics"', "found a string")),
    ({"status": "finished", "metrics": {"test/accuracy": "high", "test/loss": 0.1}}, ("test/accuracy",)),
])
def test_compare_damaged_summary_metrics(run, summary, names):
    (run / "summary.json").write_text(json.dumps(summary))
    assert_one_line_error(dojo("compare", run), str(run / "summary.json"), *names)


def test_compare_deeply_nested_summary(run):
    (run / "summary.json").write_text(DEEP)
    assert_one_line_error(dojo("compare", run), str(run / "summary.json"), "nested too deeply")


def test_compare_recipe_not_utf8(run):
    text = (run / "recipe.yaml").read_bytes()
    (run / "recipe.yaml").write_bytes(text.replace(b"name: tiny", b"name: tiny\xff"))
    assert_one_line_error(dojo("compare", run), str(run / "recipe.yaml"), "not UTF-8")


def test_compare_damaged_compare_json(run):
    (run.parent / "compare.json").write_text(DEEP)
    assert_one_line_error(dojo("compare", run.parent), str(run.parent / "compare.json"), "nested too deeply")


def test_compare_still_compares_intact_runs(run):
    res = dojo("compare", run, "--metric", "accuracy")
    assert res.exit_code == 0, res.stderr
    assert "test/accuracy" in res.output


# -- eval, predict, runs --------------------------------------------------------------------------

def test_eval_and_predict_data_info_not_an_object(run, tmp_path):
    (run / "data_info.json").write_text("[]")
    assert_one_line_error(dojo("eval", run), "data_info.json", "found a list")
    inputs = tmp_path / "x.npz"
    np.savez(inputs, x=np.zeros((2, 8), np.float32))
    assert_one_line_error(dojo("predict", run, "--input", inputs), "data_info.json", "found a list")


def test_eval_data_info_wrong_field_type(run):
    info = json.loads((run / "data_info.json").read_text())
    (run / "data_info.json").write_text(json.dumps({**info, "class_names": 3}))
    assert_one_line_error(dojo("eval", run), "data_info.json", '"class_names" must be a list')


def test_eval_deeply_nested_data_info(run):
    (run / "data_info.json").write_text(DEEP)
    assert_one_line_error(dojo("eval", run), str(run / "data_info.json"), "nested too deeply")


def test_eval_deeply_nested_calibration(run):
    (run / "calibration.json").write_text(DEEP)
    assert_one_line_error(dojo("eval", run), str(run / "calibration.json"), "nested too deeply", "dojo calibrate")


def test_runs_lists_damaged_runs(run):
    """`dojo runs` lists what it can (a listing is not refused for one bad run), without a traceback."""
    (run / "summary.json").write_text(DEEP)
    lines = metrics_lines(run)
    lines[3:3] = [b'{"step": ' + DEEP.encode() + b"\n", b'{"step": 999, "x": "\xff"}\n']
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    res = dojo("runs", "--json", run.parent)
    assert res.exit_code == 0, (res.stderr, res.exception)
    [row] = json.loads(res.output)
    assert row["status"] == "unknown" and row["steps"] == 22


# -- resume ---------------------------------------------------------------------------------------

def _torn_last_line(lines: list[bytes], covered: int) -> list[bytes]:
    return lines[:-1] + [lines[-1][:25]]            # killed while writing the final line


def _garbage_inside(lines: list[bytes], covered: int) -> list[bytes]:
    return lines[:3] + [b"}{ not json\n"] + lines[3:]     # inside what the checkpoint covers


def _byte_after(lines: list[bytes], covered: int) -> list[bytes]:
    bad = lines[covered][:12] + b"\xff" + lines[covered][12:]      # in the first line logged again
    return lines[:covered] + [bad] + lines[covered + 1:]


def _non_utf8_line(lines: list[bytes], covered: int) -> list[bytes]:
    return lines[:2] + [b"\xff\xfe\xfd\n"] + lines[2:]


@pytest.mark.parametrize("damage", [_torn_last_line, _garbage_inside, _byte_after, _non_utf8_line])
def test_resume_repairs_metrics(unfinished, trained, damage):
    """Resume drops the lines that do not parse (with a warning), keeps what the checkpoint covered,
    and logs the rest again: the file parses and equals the uninterrupted run's."""
    # Every line up to the checkpoint's step was written before it was saved.
    covered = sum(e["step"] <= RESUME_STEP for e in read_metrics(trained / "metrics.jsonl"))
    lines = metrics_lines(unfinished)
    assert 3 < covered < len(lines) - 2
    (unfinished / "metrics.jsonl").write_bytes(b"".join(damage(lines, covered)))
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 line\(s\) that do not parse"):
        res = dojo("resume", "-q", unfinished)
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert comparable(read_metrics(unfinished / "metrics.jsonl")) == comparable(read_metrics(trained / "metrics.jsonl"))
    assert dojo("report", "-q", unfinished).exit_code == 0
