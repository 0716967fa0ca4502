"""Bad input (issue 6): a data file with NaN or infinite values, a label outside the classes, wrong
shapes, a missing column, an empty split, a non-UTF-8 file, a truncated checkpoint, an unknown recipe
key. Each ends in one line on stderr that names the file and the line/row/column or key, exit code 2,
no traceback, and no existing run directory or checkpoint changed (every file hashed before/after).
Also: torch older than 2.6 is refused for loading checkpoints."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from torchdojo import Trainer, load_recipe
from torchdojo import checkpoint as ckpt
from torchdojo.checkpoint import STATE, WEIGHTS, list_checkpoints, load_checkpoint, write_manifest
from torchdojo.cli import main
from torchdojo.data import load_data
from torchdojo.errors import DojoError

from conftest import make_tiny_recipe

# -- helpers -------------------------------------------------------------------------------------------


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result, *fragments) -> str:
    """The single `error: ...` line of a clean exit 2 that contains every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception   # not an escaped exception
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file and folder below `folder`: relative path -> sha256 of the bytes ('dir' for folders).
    The writer lock file is left out: it holds the PID of the last command that wrote, not the run."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


@contextmanager
def unchanged(*folders: Path):
    before = [tree_hashes(f) for f in folders]
    assert all(before), "nothing to compare"
    yield
    assert [tree_hashes(f) for f in folders] == before


# -- a CSV data set and a finished run trained on it (built once, copied per test) --------------------

N_ROWS = 60


def csv_text(label=lambda i: ("cat", "dog")[i % 2], cell=lambda i, j: f"{((i * 7 + j * 3) % 11) / 5 - 1:.2f}") -> str:
    """Header `a,b,c,label` then N_ROWS rows; data row i is on line i + 2."""
    return "a,b,c,label\n" + "".join(f"{cell(i, 0)},{cell(i, 1)},{cell(i, 2)},{label(i)}\n" for i in range(N_ROWS))


def csv_recipe(path: str) -> dict:
    r = make_tiny_recipe()
    r["data"] = {"name": "csv", "path": path, "target": "label"}
    r["phases"] = [{"name": "p", "steps": 6, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05}}]
    r["checkpoint"] = {"every_steps": 2, "keep_last": 3}
    return r


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A folder with `data.csv` and `run/`, a finished run whose recipe names the data by the relative
    path `data.csv`: a copy of the folder is a self-contained run with its own data file."""
    root = tmp_path_factory.mktemp("template")
    (root / "data.csv").write_text(csv_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        Trainer(load_recipe(csv_recipe("data.csv")), root / "run", quiet=True).fit()
    assert len(list_checkpoints(root / "run" / "checkpoints")) == 3
    assert (root / "run" / "checkpoints" / "final" / WEIGHTS).is_file()
    return root


@pytest.fixture
def work(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template in tmp_path, which is also the working directory."""
    shutil.copy(template / "data.csv", tmp_path / "data.csv")
    shutil.copytree(template / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def unfinish(run: Path) -> Path:
    """Make a finished run look interrupted after its last step checkpoint (resume goes through them)."""
    shutil.rmtree(run / "checkpoints" / "final")
    (run / "summary.json").unlink()
    return run


def test_the_fixture_run_is_good(work):
    """Control: the untouched copies evaluate, predict and resume (so the failures below are the inputs')."""
    result = run_cli("eval", work / "run")
    assert result.exit_code == 0, result.output
    (work / "in.csv").write_text("a,b,c\n0.1,0.2,0.3\n1,2,3\n")
    np.savez(work / "in.npz", x=np.array([[0.1, 0.2, 0.3], [1, 2, 3]]))
    for inputs in (work / "in.csv", work / "in.npz"):
        result = run_cli("predict", work / "run", "--input", inputs)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0].startswith("prediction") and len(result.stdout.splitlines()) == 3
    result = run_cli("resume", unfinish(work / "run"), "-q")
    assert result.exit_code == 0, result.output


# -- bad CSV training data: new run (nothing created) and existing run (resume: nothing changed) ------

def _with_line(text: str, line: int, replace) -> str:
    lines = text.splitlines(keepends=True)
    lines[line - 1] = replace(lines[line - 1])
    return "".join(lines)


BAD_CSV = {
    # name: (file bytes, fragments of the error line besides the file name)
    "nan-feature": (_with_line(csv_text(), 5, lambda s: "0.1,nan,0.3,cat\n").encode(),
                    [", line 5, column 'b'", "not a finite number"]),
    "inf-feature": (_with_line(csv_text(), 9, lambda s: "-inf,0,0,dog\n").encode(),
                    [", line 9, column 'a'", "'-inf' is not a finite number"]),
    "float32-overflow": (_with_line(csv_text(), 7, lambda s: "0,0,1e39,cat\n").encode(),
                         [", line 7, column 'c'", "'1e39' is not a finite number"]),
    "empty-cell": (_with_line(csv_text(), 4, lambda s: "0,,0,dog\n").encode(),
                   [", line 4, column 'b'", "missing value"]),
    "nan-label": (csv_text(label=lambda i: "nan" if i == 10 else str(i % 2)).encode(),
                  [", line 12, column 'label'", "'nan' is not a finite number"]),
    "inf-label": (csv_text(label=lambda i: "inf" if i == 3 else str(i % 3)).encode(),
                  [", line 5, column 'label'", "'inf' is not a finite number"]),
    "missing-label": (csv_text(label=lambda i: "" if i == 20 else ("cat", "dog")[i % 2]).encode(),
                      [", line 22, column 'label'", "missing label"]),
    "non-utf8": (_with_line(csv_text(), 3, lambda s: s.replace("dog", "d\xe9g")).encode("latin-1"),
                 [", line 3: not UTF-8 text", "b'\\xe9'"]),
    "ragged-row": (_with_line(csv_text(), 6, lambda s: "1,2\n").encode(),
                   [", line 6: 2 fields, expected 4"]),
    "missing-target-column": (csv_text().replace("a,b,c,label", "a,b,c,lable", 1).encode(),
                              [": no target column 'label'", "did you mean 'lable'"]),
    "duplicate-column": (csv_text().replace("a,b,c,label", "a,b,a,label", 1).encode(),
                         [", line 1: duplicate column name 'a'"]),
    "header-only": (b"a,b,c,label\n", [": no data rows after the header"]),
    "empty-file": (b"", [": the file is empty"]),
    "empty-split": (b"a,b,c,label\n1,2,3,cat\n4,5,6,dog\n", ["leaves an empty split"]),
    "regression-text-target": (csv_text(label=lambda i: "oops" if i == 7 else f"{i / 7:.3f}").encode(),
                               [", line 9, column 'label'", "non-numeric"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_bad_csv_training_data(work, case):
    data, fragments = BAD_CSV[case]
    bad = work / f"{case}.csv"
    bad.write_bytes(data)
    recipe = csv_recipe(str(bad))
    if case == "regression-text-target":
        recipe["data"]["task_type"] = "regression"
        recipe["task"] = {"name": "regress"}
    recipe_file = work / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    run_dir = work / "new-run"
    run_dir.mkdir()                    # an existing, empty run directory stays empty
    error_line(run_cli("train", recipe_file, "--run-dir", run_dir, "-q"), str(bad), *fragments)
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("case", ["nan-feature", "non-utf8", "missing-target-column", "empty-split"])
@pytest.mark.parametrize("command", ["resume", "eval"])
def test_existing_run_whose_data_file_went_bad(work, case, command):
    """The run's data file is edited after training: resume/eval stop before touching the run."""
    data, fragments = BAD_CSV[case]
    run = unfinish(work / "run") if command == "resume" else work / "run"
    (work / "data.csv").write_bytes(data)
    with unchanged(run):
        error_line(run_cli(command, run), "data.csv", *fragments)


def test_csv_with_utf8_byte_order_mark_loads(work):
    """Control for the UTF-8 check: a BOM (as Excel writes) is not part of the first column's name."""
    path = work / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + csv_text().encode())
    bundle = load_data({"name": "csv", "path": str(path), "target": "label"}, seed=0)
    assert bundle.info.feature_names == ["a", "b", "c"]
    assert bundle.info.class_names == ["cat", "dog"]


# -- bad NPZ training data -------------------------------------------------------------------------

def _npz_bytes(tmp: Path, **arrays) -> bytes:
    np.savez(tmp / "scratch.npz", **arrays)
    return (tmp / "scratch.npz").read_bytes()


def _x(n=40, d=3):
    return np.random.default_rng(0).normal(size=(n, d))


def _y(n=40):
    return np.arange(n) % 2


def _bad_npz(case: str, tmp: Path) -> tuple[bytes, list[str], dict]:
    """(file bytes, fragments, extra data options) of one bad NPZ case."""
    x, y = _x(), _y()
    if case == "nan-x":
        x[13, 1] = np.nan
        return _npz_bytes(tmp, x=x, y=y), ["array 'x'", "NaN or inf", "row 13"], {}
    if case == "inf-x-test":
        x_test = _x(8)
        x_test[5, 0] = np.inf
        return _npz_bytes(tmp, x=x, y=y, x_test=x_test, y_test=_y(8)), ["array 'x_test'", "row 5"], {}
    if case == "float32-overflow-y":
        y = np.linspace(0, 1, 40)
        y[2] = 1e300
        return _npz_bytes(tmp, x=x, y=y), ["array 'y'", "row 2"], {}
    if case == "negative-label":
        y[17] = -1
        return _npz_bytes(tmp, x=x, y=y), ["'y' must hold class ids 0..K-1", "row 17 has -1"], {}
    if case == "fractional-label":
        y = y.astype(float)
        y[4] = 0.5
        return (_npz_bytes(tmp, x=x, y=y), ["'y' must hold class ids 0..K-1", "row 4 has 0.5"],
                {"task_type": "classification"})
    if case == "huge-class-id":
        y[9] = 10 ** 12
        return (_npz_bytes(tmp, x=x, y=y), ["class id 1000000000000 in 'y' row 9 is out of range"],
                {"task_type": "classification"})
    if case == "x-rank-1":
        return _npz_bytes(tmp, x=np.zeros(40), y=y), ["'x' must have 2, 3 or 4 dimensions", "(40,)"], {}
    if case == "y-length":
        return _npz_bytes(tmp, x=x, y=_y(39)), ["'y' must have shape (N,) with N=40", "(39,)"], {}
    if case == "x-test-width":
        return (_npz_bytes(tmp, x=x, y=y, x_test=_x(8, 4), y_test=_y(8)),
                ["'x_test' has shape (4,) per row, 'x' has (3,)"], {})
    if case == "2d-labels":
        return (_npz_bytes(tmp, x=x, y=np.stack([y, y], 1)), ["'y' must have shape (N,) of class ids"],
                {"task_type": "classification"})
    if case == "string-x":
        return _npz_bytes(tmp, x=x.astype(str), y=y), ["array 'x' must be numeric", "dtype <U"], {}
    if case == "missing-y":
        return _npz_bytes(tmp, x=x), ["missing array 'y' (found: x)"], {}
    if case == "truncated":
        good = _npz_bytes(tmp, x=x, y=y)
        return good[:len(good) // 2], ["not a readable NPZ file"], {}
    if case == "empty-file":
        return b"", ["not a readable NPZ file"], {}
    if case == "npy-not-npz":
        np.save(tmp / "scratch.npy", x)
        return (tmp / "scratch.npy").read_bytes(), ["not an NPZ archive"], {}
    raise AssertionError(case)


NPZ_CASES = ["nan-x", "inf-x-test", "float32-overflow-y", "negative-label", "fractional-label", "huge-class-id",
             "x-rank-1", "y-length", "x-test-width", "2d-labels", "string-x", "missing-y", "truncated",
             "empty-file", "npy-not-npz"]


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_training_data(tmp_path, case):
    data, fragments, options = _bad_npz(case, tmp_path)
    bad = tmp_path / f"{case}.npz"
    bad.write_bytes(data)
    recipe = make_tiny_recipe()
    recipe["data"] = {"name": "npz", "path": str(bad), **options}
    if case == "float32-overflow-y":
        recipe["task"] = {"name": "regress"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "new-run"
    error_line(run_cli("train", tmp_path / "r.yaml", "--run-dir", run_dir, "-q"), str(bad), *fragments)
    assert not run_dir.exists()


# -- predict / eval with bad inputs ----------------------------------------------------------------

@pytest.mark.parametrize("case, text, fragments", [
    ("nan", b"a,b,c\n1,2,3\n4,NaN,6\n", [", line 3, column 'b'", "not a finite number"]),
    ("inf", b"a,b,c\n1,2,3\n4,5,Infinity\n", [", line 3, column 'c'", "not a finite number"]),
    ("non-utf8", b"a,b,c\n1,2,3\n\xff\xfe,5,6\n", [", line 3: not UTF-8 text"]),
    ("missing-column", b"a,c,label\n1,3,x\n", [": missing feature column(s) used in training: b"]),
    ("header-only", b"a,b,c\n", [": no data rows after the header"]),
])
def test_predict_bad_csv_input(work, case, text, fragments):
    inputs, out = work / f"{case}.csv", work / "out.csv"
    inputs.write_bytes(text)
    with unchanged(work / "run"):
        error_line(run_cli("predict", work / "run", "--input", inputs, "--output", out), str(inputs), *fragments)
    assert not out.exists()


@pytest.mark.parametrize("case, fragments", [
    ("wrong-width", ["inputs have shape (5,) per row, the model expects (3,)"]),
    ("nan", ["NaN or infinite", "row 1"]),
    ("truncated", ["not a readable NPZ"]),
    ("empty-file", ["not a readable NPZ"]),
    ("no-x", ["no array 'x'"]),
])
def test_predict_bad_npz_input(work, case, fragments):
    inputs = work / f"{case}.npz"
    if case == "wrong-width":
        np.savez(inputs, x=np.zeros((2, 5)))
    elif case == "nan":
        np.savez(inputs, x=np.array([[0.0, 0, 0], [1, np.nan, 1]]))
    elif case == "truncated":
        np.savez(inputs, x=np.zeros((20, 3)))
        inputs.write_bytes(inputs.read_bytes()[:100])
    elif case == "empty-file":
        inputs.write_bytes(b"")
    else:
        np.savez(inputs, features=np.zeros((2, 3)))
    with unchanged(work / "run"):
        error_line(run_cli("predict", work / "run", "--input", inputs), str(inputs), *fragments)


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_label_outside_the_trained_classes(work, command):
    """The run's CSV gained a label after training: today the weights fail to load with a RuntimeError."""
    run = unfinish(work / "run") if command == "resume" else work / "run"
    (work / "data.csv").write_text(csv_text(label=lambda i: "bird" if i == 30 else ("cat", "dog")[i % 2]))
    with unchanged(run):
        error_line(run_cli(command, run), "data.csv", "label 'bird' is not one of the 2 classes", "cat, dog")


def test_check_same_data_names_the_change(work):
    """DataInfo.check_same_data (used by the trainer patch above) on each kind of change."""
    saved = json.loads((work / "run" / "data_info.json").read_text())
    spec = {"name": "csv", "path": "data.csv", "target": "label"}

    def info_of(text):
        (work / "data.csv").write_text(text)
        return load_data(spec, seed=0).info

    info_of(csv_text()).check_same_data(saved, "data.csv")        # unchanged data: fine
    with pytest.raises(DojoError, match=r"data.csv: label 'bird' is not one of the 2 classes .*\(cat, dog\)"):
        info = info_of(csv_text(label=lambda i: "bird" if i == 30 else ("cat", "dog")[i % 2]))
        info.check_same_data(saved, "data.csv")
    with pytest.raises(DojoError, match="no longer has the class.*dog"):
        info_of(csv_text(label=lambda i: "cat")).check_same_data(saved, "data.csv")
    with pytest.raises(DojoError, match="regression data"):
        info_of(csv_text(label=lambda i: f"{i / 7:.3f}")).check_same_data(saved, "data.csv")
    extra = csv_text().replace("a,b,c,label\n", "a,b,c,d,label\n").splitlines()
    extra = [extra[0]] + [",".join(r.split(",")[:3] + ["1"] + r.split(",")[3:]) for r in extra[1:]]
    with pytest.raises(DojoError, match=r"rows have shape \(4,\), the run was trained on \(3,\)"):
        info_of("\n".join(extra) + "\n").check_same_data(saved, "data.csv")


# -- truncated checkpoints --------------------------------------------------------------------------

def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if keep is None else keep])


def test_truncated_checkpoint_is_named(work):
    newest = list_checkpoints(work / "run" / "checkpoints")[-1]
    _truncate(newest / STATE)
    with pytest.raises(DojoError) as info:
        load_checkpoint(newest)
    message = str(info.value)
    assert str(newest) in message and "state.pt has" in message and "truncated" in message
    assert "\n" not in message


def test_resume_with_every_checkpoint_truncated(work, recwarn):
    run = unfinish(work / "run")
    checkpoints = list_checkpoints(run / "checkpoints")
    for ck in checkpoints:
        _truncate(ck / (WEIGHTS if ck == checkpoints[0] else STATE))
    with unchanged(run):
        error_line(run_cli("resume", run, "-q"), str(run), "no checkpoint to resume from")
    skipped = [str(w.message) for w in recwarn if "skipping checkpoint" in str(w.message)]
    assert len(skipped) == len(checkpoints)
    for ck, text in zip(reversed(checkpoints), skipped):     # newest first, each named with its reason
        assert str(ck) in text and "truncated or partial" in text


def test_resume_with_a_truncated_checkpoint_that_matches_its_manifest(work):
    """A state.pt truncated before the manifest was written (the manifest agrees with it): torch's
    loader error becomes one warning naming the checkpoint, and resume falls back to the older good
    one (issue 21: before, it stopped there although a good checkpoint was left)."""
    run = unfinish(work / "run")
    newest = list_checkpoints(run / "checkpoints")[-1]
    _truncate(newest / STATE)
    write_manifest(newest)
    with pytest.warns(UserWarning, match=f"checkpoint {newest} cannot be read: state.pt: "):
        result = run_cli("resume", run, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_eval_with_truncated_final_weights(work):
    final = work / "run" / "checkpoints" / "final" / WEIGHTS
    _truncate(final, keep=100)
    with unchanged(work / "run"):
        error_line(run_cli("eval", work / "run"), str(final.parent), "model.safetensors has 100 bytes", "truncated")


def test_truncated_checkpoint_resume_subprocess(work):
    """As a user sees it (a real process, real stderr): the warnings name each skipped checkpoint, the
    last line is the error, exit code 2, no traceback."""
    run = unfinish(work / "run")
    checkpoints = list_checkpoints(run / "checkpoints")
    for ck in checkpoints:
        _truncate(ck / STATE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with unchanged(run):
        proc = subprocess.run([sys.executable, "-m", "torchdojo", "resume", str(run), "-q"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and str(run) in lines[-1]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    for ck in checkpoints:
        assert any(str(ck) in ln and "truncated" in ln for ln in lines), proc.stderr


# -- recipes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, fragments", [
    (lambda r: r["phases"][0]["optimizer"].update(learning_rate=0.1),
     ["phases.0.optimizer.learning_rate", "unknown key 'learning_rate' for optimizer 'sgd'",
      "valid keys: dampening, lr,"]),
    (lambda r: r.update(bogus=1), ["bogus: unknown key 'bogus'"]),
    (lambda r: r["data"].update(targte="label"), ["data.targte", "unknown key 'targte'", "did you mean 'target'"]),
    (lambda r: r["model"].update(hiden=[4]), ["model.hiden", "did you mean 'hidden'"]),
], ids=["optimizer", "top-level", "data", "model"])
def test_unknown_recipe_key_leaves_existing_run_alone(work, mutate, fragments):
    recipe = csv_recipe("data.csv")
    mutate(recipe)
    (work / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with unchanged(work / "run"):
        error_line(run_cli("train", work / "bad.yaml", "--run-dir", work / "run", "-q"), *fragments)


@pytest.mark.parametrize("override, fragments", [
    ("phases.p.steps=.inf", ["phases.0.steps"]),
    ("phases.p.epochs=.inf", ["phases.0.epochs", "finite number"]),
    ("phases.p.optimizer.lr=.nan", ["phases.0.optimizer.lr", "finite number"]),
    ("model.hidden=[-16]", ["model.hidden.0", "greater than 0"]),
    ("model.dropout=1.5", ["model.dropout", "less than 1"]),
], ids=["inf-steps", "inf-epochs", "nan-lr", "negative-width", "dropout-above-1"])
def test_out_of_range_values_are_refused_before_anything_is_built(work, override, fragments):
    recipe = csv_recipe("data.csv")
    if "epochs" in override:
        recipe["phases"][0].pop("steps")
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    with unchanged(work / "run"):
        error_line(run_cli("train", work / "r.yaml", override, "--run-dir", work / "run", "-q"), *fragments)


def test_resume_with_a_damaged_summary_json(work):
    """A damaged summary.json (power loss) does not stop a resume: the checkpoints say where the run is."""
    run = unfinish(work / "run")
    (run / "summary.json").write_bytes(b'{"status": "fini')
    result = run_cli("resume", run, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_non_utf8_recipe_leaves_existing_run_alone(work):
    path = work / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(csv_recipe("data.csv")).replace("name: tiny", "name: t\xefny").encode("latin-1"))
    with unchanged(work / "run"):
        error_line(run_cli("train", path, "--run-dir", work / "run", "-q"), str(path), "not UTF-8", "b'\\xef'")


@pytest.mark.parametrize("text, fragments", [
    ("name: x\n{[1, 2]: 3}: 4\n", ["line 2", "unhashable"]),
    ("name: x\n? {a: 1}\n: 4\n", ["line 2", "unhashable"]),
    ("seed: " + "[" * 3000 + "]" * 3000 + "\n", ["nested too deeply"]),
    ("name: x\nseed: 1\nseed: 2\n", ["line 3", "duplicate key 'seed'"]),
    ("name: [unclosed\n", ["line 2", "invalid YAML"]),
], ids=["list-key", "mapping-key", "deep-nesting", "duplicate-key", "unclosed"])
def test_bad_yaml_leaves_existing_run_alone(work, text, fragments):
    path = work / "bad.yaml"
    path.write_text(text)
    with unchanged(work / "run"):
        error_line(run_cli("train", path, "--run-dir", work / "run", "-q"), str(path), *fragments)


def test_run_dir_with_non_utf8_recipe_yaml(work):
    recipe = work / "run" / "recipe.yaml"
    recipe.write_bytes(recipe.read_bytes().replace(b"name: tiny", b"name: t\xefny"))
    with unchanged(work / "run"):
        error_line(run_cli("eval", work / "run"), str(recipe), "not UTF-8")


def test_existing_empty_run_dir_stays_empty_on_bad_data(work):
    """The run directory is created only once the data and the model are built."""
    (work / "data.csv").write_text(_with_line(csv_text(), 3, lambda s: "x,1,2,cat\n"))
    empty = work / "empty"
    empty.mkdir()
    (work / "r.yaml").write_text(yaml.safe_dump(csv_recipe("data.csv")))
    error_line(run_cli("train", work / "r.yaml", "--run-dir", empty, "-q"), "data.csv", "'a' are not numeric")
    assert list(empty.iterdir()) == []


# -- torch older than 2.6 is refused for loading checkpoints --------------------------------------

def _refuse_torch_load(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    return calls


@pytest.mark.parametrize("version", ["2.5.1+cpu", "2.4.0", "1.13.1", "2.5.1+cu124", "unknown"])
def test_old_torch_is_refused_before_loading(work, monkeypatch, version):
    newest = list_checkpoints(work / "run" / "checkpoints")[-1]
    monkeypatch.setattr(torch, "__version__", version)
    calls = _refuse_torch_load(monkeypatch)
    with pytest.raises(DojoError, match=r"needs torch >= 2\.6, this is torch " + version.replace("+", r"\+")):
        load_checkpoint(newest)
    assert calls == []


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+git1234", "2.10.1+cpu", "3.0.0"])
def test_new_torch_versions_load(work, monkeypatch, version):
    """Versions compare as numbers, not strings ('2.10' is newer than '2.6')."""
    newest = list_checkpoints(work / "run" / "checkpoints")[-1]
    monkeypatch.setattr(torch, "__version__", version)
    weights, state = load_checkpoint(newest)
    assert state["step"] == 6 and "head.weight" in weights


def test_old_torch_resume_exits_2_and_leaves_the_run_alone(work, monkeypatch):
    run = unfinish(work / "run")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    calls = _refuse_torch_load(monkeypatch)
    with unchanged(run):
        error_line(run_cli("resume", run, "-q"), "checkpoint", str(run / "checkpoints" / "step-00000006"),
                   "needs torch >= 2.6", "upgrade torch")
    assert calls == []
    assert ckpt.MIN_TORCH_FOR_LOADING == (2, 6)
