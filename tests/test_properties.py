"""Property-based tests (hypothesis, issue 6): random recipe documents and random data files thrown at
the loaders. Whatever the input, the loaders either accept it or raise a DojoError (which the CLI turns
into one line and exit code 2), never another exception; data errors name the file.

Nothing here trains: recipes are only validated, data files only loaded and split; the few CLI runs
use inputs that are known to fail before training starts. Every test is derandomized so CI is
reproducible."""
from __future__ import annotations

import csv as _csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from torchdojo.cli import main
from torchdojo.data import load_data
from torchdojo.errors import DojoError
from torchdojo.recipe import load_recipe, parse_yaml

from conftest import make_tiny_recipe

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])

_SCRATCH = Path()


@pytest.fixture(scope="module", autouse=True)
def _scratch_folder(tmp_path_factory):
    """One temporary folder for the whole module: hypothesis runs a test body many times per call of a
    function-scoped fixture such as tmp_path, so the tests write their files here instead."""
    global _SCRATCH
    _SCRATCH = tmp_path_factory.mktemp("properties")


def scratch_file(name: str, data: bytes | str) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def assert_clean_cli_failure(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- random recipe documents ------------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(["name", "seed", "data", "model", "task", "phases", "methods", "steps", "epochs", "lr",
                     "optimizer", "schedule", "losses", "weight", "batch_size", "path", "target", "hidden",
                     "freeze", "param_groups", "rules", "match", "imbalance", "ratio", "minority", "eval",
                     "checkpoint", "log", "nonfinite", "policy", "start", "end", "every_epochs", "inner"]),
    st.text(max_size=8))
NAMES = st.sampled_from(["mlp", "cnn", "sgd", "adamw", "lookahead", "cosine", "warmup", "cross_entropy",
                         "focal", "classify", "regress", "ema", "iris", "csv", "npz", "synthetic_tabular",
                         "balanced", "raise", "skip", "rollback", ""])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.integers(), st.floats(), NAMES,
                    st.text(max_size=10))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)),
                      max_leaves=20)


def _outcome(raw) -> str:
    """'ok' or 'error' for a raw recipe mapping; any exception other than DojoError fails the test."""
    try:
        load_recipe(raw)
    except DojoError as exc:
        assert str(exc).strip() and "\n" not in str(exc), f"not one line: {exc!r}"
        return "error"
    return "ok"


@settings(max_examples=150, **SETTINGS)
@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_random_recipe_documents(raw):
    _outcome(raw)


def _paths(node, prefix=()):
    """Every (path) to a value in a nested dict/list, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _parent(root, path):
    node = root
    for part in path[:-1]:
        node = node[part]
    return node


@st.composite
def mutated_recipes(draw):
    """The tiny recipe with one to four mutations: a key deleted, a value replaced by another type or a
    negative/zero/huge number, an unknown key added, a key misspelled, a list emptied."""
    r = make_tiny_recipe()
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(r))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(r, path), path[-1]
        op = draw(st.sampled_from(["delete", "replace", "negate", "add_key", "misspell", "empty"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(VALUES)
        elif op == "negate":
            value = parent[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                value = 1
            parent[key] = draw(st.sampled_from([-value, 0, -1, 0.5, 10 ** 30, math.inf, math.nan, str(value)]))
        elif op == "add_key" and isinstance(parent[key], dict):
            parent[key][draw(KEYS)] = draw(SCALARS)
        elif op == "misspell" and isinstance(parent, dict) and isinstance(key, str) and len(key) > 1:
            i = draw(st.integers(0, len(key) - 1))
            parent[key[:i] + key[i + 1:]] = parent.pop(key)
        elif op == "empty" and isinstance(parent[key], (list, dict)):
            parent[key] = type(parent[key])()
    return r


@settings(max_examples=300, **SETTINGS)
@given(mutated_recipes())
@example(make_tiny_recipe())                                      # the unmutated recipe validates
def test_mutated_recipes(raw):
    outcome = _outcome(raw)
    if raw == make_tiny_recipe():
        assert outcome == "ok"


def test_mutations_reach_both_outcomes():
    """The mutation strategy is not degenerate: some mutants validate, most do not."""
    outcomes = []

    @settings(max_examples=60, **SETTINGS)
    @given(mutated_recipes())
    def collect(raw):
        outcomes.append(_outcome(raw))

    collect()
    assert outcomes.count("ok") >= 1 and outcomes.count("error") >= 20


@st.composite
def overrides(draw):
    key = ".".join(draw(st.lists(st.one_of(KEYS, st.integers(-3, 3).map(str), NAMES), min_size=1, max_size=4)))
    value = draw(st.one_of(st.just(""), st.text(max_size=12), SCALARS.map(lambda v: yaml.safe_dump(v).strip())))
    return f"{key}={value}" if draw(st.booleans()) else key


@settings(max_examples=150, **SETTINGS)
@given(st.lists(overrides(), min_size=1, max_size=3))
def test_random_overrides(assignments):
    try:
        load_recipe(make_tiny_recipe(), assignments)
    except DojoError as exc:
        assert str(exc).strip() and "\n" not in str(exc), f"not one line: {exc!r}"


# YAML text: YAML-ish punctuation, plus documents dumped from random values and then cut or spliced.
YAML_TOKENS = st.sampled_from(list("{}[]:,-?!&*#|>'\"\n\t %@`=.0123456789abcxyz_")
                              + ["\u00e9", "\ufeff", "\x00", "!!python/", "---", "...", "name", "phases"])


def tokens(alphabet, max_size: int):
    return st.lists(alphabet, max_size=max_size).map("".join)


YAML_TEXT = st.one_of(
    tokens(YAML_TOKENS, 60),
    st.builds(lambda v, cut: yaml.safe_dump(v)[:cut], VALUES, st.integers(0, 200)),
    st.builds(lambda v, junk, at: (lambda s: s[:at] + junk + s[at:])(yaml.safe_dump(v)), VALUES,
              tokens(YAML_TOKENS, 8), st.integers(0, 100)),
)


@settings(max_examples=300, **SETTINGS)
@given(YAML_TEXT)
@example("{[1]: 2}")
@example("name: x\n? [a, b]\n: 3\n")
def test_random_yaml_text(text):
    try:
        raw = parse_yaml(text, "doc.yaml")
    except DojoError as exc:
        assert str(exc).startswith("doc.yaml"), str(exc)
        return
    if isinstance(raw, dict):
        _outcome(raw)


@settings(max_examples=12, **SETTINGS)
@given(st.one_of(YAML_TEXT,
                 mutated_recipes().map(json.dumps)))
def test_random_recipe_files_through_the_cli(text):
    """`dojo train FILE`: one error line and exit code 2 (recipes that validate are skipped: no training)."""
    try:
        raw = parse_yaml(text, "x")
        if isinstance(raw, dict):
            load_recipe(raw)
            assume(False)                  # a valid recipe would train
    except DojoError:
        pass
    path = scratch_file("recipe.yaml", text.encode("utf-8", "surrogatepass"))
    run_dir = _SCRATCH / "cli-run"
    result = CliRunner().invoke(main, ["train", str(path), "--run-dir", str(run_dir), "-q"])
    assert_clean_cli_failure(result)
    assert not run_dir.exists()


# -- random CSV files -------------------------------------------------------------------------------

NUMBERS = st.one_of(st.integers(-5, 5).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "NaN", "inf", "-Infinity", "1e39", "-1e400", "1_0", " 3 ", "0x10",
                                     "1,5", "", "  "]))
CELLS = st.one_of(NUMBERS, NUMBERS, st.text(max_size=6),
                  st.sampled_from(["cat", "dog", "\"q\"\"uoted\"", "a\nb", "\u00e9", "\x00", "\r"]))
COLUMN_NAMES = st.one_of(st.sampled_from(["a", "b", "c", "label", "y", ""]), st.text(max_size=5))


GOOD_NUMBERS = st.one_of(st.integers(-100, 100).map(str), st.floats(-1e6, 1e6).map(lambda f: f"{f:.4g}"))
LABELS = st.one_of(st.sampled_from([["cat", "dog"], ["0", "1", "2"], ["1.5", "2.5"], ["-1", "7"]]),
                   st.lists(st.text(max_size=4), min_size=1, max_size=4))


@st.composite
def csv_files(draw) -> tuple[bytes, str]:
    """(file bytes, target column name): random bytes, random CSV-ish text, or a table that starts valid
    (unique column names, numeric features, a label column) and then gets a few random corruptions."""
    kind = draw(st.sampled_from(["table", "table", "table", "table", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), draw(COLUMN_NAMES)
    if kind == "text":
        header = draw(st.lists(COLUMN_NAMES, max_size=5))
        text = draw(tokens(st.sampled_from(list(",\"\n\r abc123.-e") + ["nan", "inf", "label", "\u00e9"]), 120))
        target = draw(st.sampled_from(header) if header else COLUMN_NAMES)
        return ",".join(header).encode() + b"\n" + text.encode(), target
    header = draw(st.lists(st.one_of(st.sampled_from(["a", "b", "c", "d", "label"]), COLUMN_NAMES),
                           min_size=2, max_size=5, unique=True))
    target = draw(st.sampled_from(header)) if draw(st.integers(0, 9)) else draw(COLUMN_NAMES)
    labels = draw(LABELS)
    n_rows = draw(st.sampled_from([40, 40, 12, 5, 3, 2, 1, 0]))
    rows = [[draw(st.sampled_from(labels)) if name == target else draw(GOOD_NUMBERS) for name in header]
            for _ in range(n_rows)]
    for _ in range(draw(st.integers(0, 2)) if rows else 0):           # corrupt a few cells
        row = draw(st.sampled_from(rows))
        row[draw(st.integers(0, len(row) - 1))] = draw(CELLS)
    if rows and not draw(st.integers(0, 5)):                            # a ragged row
        row = draw(st.sampled_from(rows))
        del row[draw(st.integers(0, len(row))):]
        row.extend(draw(st.lists(CELLS, max_size=2)))
    buf = io.StringIO()
    writer = _csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(header)
    writer.writerows(rows)
    text = buf.getvalue()
    if not draw(st.integers(0, 5)):                                     # cut the file short
        text = text[:draw(st.integers(0, len(text)))]
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, "replace"), target


DATA_OPTIONS = st.just({}) | st.fixed_dictionaries({}, optional={
    "task_type": st.sampled_from(["auto", "classification", "regression"]),
    "drop_non_numeric": st.booleans(),
    "features": st.lists(COLUMN_NAMES, max_size=3),
    "val_fraction": st.sampled_from([0.1, 0.3, 0.5]),
    "test_fraction": st.sampled_from([0.1, 0.2, 0.6]),
    "standardize": st.booleans(),
})


def _load_csv(data: bytes, target: str, options: dict):
    """The bundle, or the DojoError, of one CSV through the trainer's data path (`load_data`)."""
    path = scratch_file("data.csv", data)
    try:
        return load_data({"name": "csv", "path": str(path), "target": target, **options}, seed=0), path
    except DojoError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        assert "\n" not in str(exc), f"not one line: {exc!r}"
        return exc, path


@settings(max_examples=400, **SETTINGS)
@given(csv_files(), DATA_OPTIONS)
@example((b"a,b,label\n" + b"".join(b"%d,%d,%s\n" % (i, i % 3, (b"x", b"y")[i % 2]) for i in range(20)), "label"), {})
@example((b"a,label\n1,\n2,1\n3,0\n", "label"), {})                       # empty label cell, numeric labels
@example((b"a,label\n1,0\n2,1\n3,0\n4,1\n5,0\n", "label"), {})            # too few rows to stratify
@example((b"a,label\n1,0\n2,1e39\n", "label"), {"task_type": "regression"})
@example((b"a,label\n1,x\n2,x\n3,y\n4,y\n5,z\n6,z\n", "label"), {"test_fraction": 0.6})   # sklearn refused to stratify
@example(("a,label\n1,\u00e9\n".encode("latin-1"), "label"), {})
def test_random_csv_files(case, options):
    data, target = case
    result, _ = _load_csv(data, target, options)
    if isinstance(result, DojoError):
        return
    info = result.info
    for split in (result.train, result.val, result.test):
        assert len(split) > 0
        assert bool(split.x.isfinite().all())
        if info.task_type == "classification":
            assert 0 <= int(split.y.min()) and int(split.y.max()) < info.num_outputs
        else:
            assert bool(split.y.isfinite().all())
    assert sum(info.sizes.values()) == len(result.train) + len(result.val) + len(result.test)


def test_random_csv_files_reach_both_outcomes():
    """The CSV strategy is not degenerate: some files load, many fail, with varied messages."""
    outcomes: list = []

    @settings(max_examples=150, **SETTINGS)
    @given(csv_files(), DATA_OPTIONS)
    def collect(case, options):
        outcomes.append(_load_csv(*case, options)[0])

    collect()
    errors = [str(o).split(": ", 1)[-1][:20] for o in outcomes if isinstance(o, DojoError)]
    assert len(errors) < len(outcomes), "no CSV loaded"
    assert len(set(errors)) >= 5, set(errors)


@settings(max_examples=8, **SETTINGS)
@given(csv_files())
def test_random_csv_files_through_the_cli(case):
    """`dojo train` on a tiny recipe that reads the CSV: one error line naming the file, exit code 2."""
    data, target = case
    result, path = _load_csv(data, target, {})
    assume(isinstance(result, DojoError))            # a loadable file would train
    recipe = make_tiny_recipe()
    recipe["data"] = {"name": "csv", "path": str(path), "target": target}
    recipe["phases"] = [{"steps": 1, "optimizer": {"name": "sgd", "lr": 0.1}}]
    recipe_file = scratch_file("csv-recipe.yaml", json.dumps(recipe))
    run_dir = _SCRATCH / "csv-run"
    line = assert_clean_cli_failure(CliRunner().invoke(main, ["train", str(recipe_file), "--run-dir", str(run_dir),
                                                              "-q"]))
    assert str(path) in line
    assert not run_dir.exists()


# -- random NPZ files -------------------------------------------------------------------------------

ARRAYS = st.builds(
    lambda shape, dtype, fill, special: _array(shape, dtype, fill, special),
    st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
    st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "complex64", "U3", "float16"]),
    st.integers(-3, 60),
    st.sampled_from([None, np.nan, np.inf, -1, 2.5, 1e300, 10 ** 9]),
)


def _array(shape, dtype, fill, special):
    n = int(np.prod(shape)) if shape else 1
    a = (np.arange(n) % max(abs(fill), 1)).reshape(shape) if shape else np.array(fill)
    if special is not None and a.size:
        a = a.astype(np.float64)
        a.flat[0] = special
    with np.errstate(all="ignore"):
        return a.astype(dtype)


@settings(max_examples=200, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["x", "y", "x_test", "y_test", "z"]), ARRAYS, max_size=4),
       st.one_of(st.none(), st.integers(0, 400)),
       st.sampled_from(["auto", "classification", "regression"]))
@example({"x": np.zeros((10, 2)), "y": np.arange(10) % 2}, None, "auto")
def test_random_npz_files(arrays, cut, task_type):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue() if cut is None else buf.getvalue()[:cut]
    path = scratch_file("data.npz", data)
    try:
        bundle = load_data({"name": "npz", "path": str(path), "task_type": task_type}, seed=0)
    except DojoError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        return
    for split in (bundle.train, bundle.val, bundle.test):
        assert len(split) > 0 and bool(split.x.isfinite().all())
