"""Security: nothing torchdojo reads from disk (checkpoints, weights, snapshots, recipes, NPZ inputs)
may execute code. A static scan of the package source plus end-to-end attempts with malicious files."""
from __future__ import annotations

import ast
import io
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import torchdojo
from torchdojo import Trainer, load_recipe
from torchdojo.checkpoint import STATE, WEIGHTS, list_checkpoints, load_checkpoint, save_weights
from torchdojo.cli import main
from torchdojo.errors import DojoError
from torchdojo.methods.snapshot import snapshot_files
from torchdojo.recipe import parse_yaml

from conftest import make_tiny_recipe

PKG = Path(torchdojo.__file__).resolve().parent


# -- 1. static scan ------------------------------------------------------------------------------------

def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _scan(path: Path) -> list[str]:
    problems = []
    tree = ast.parse(path.read_text(), str(path))
    where = lambda n: f"{path.relative_to(PKG.parent)}:{n.lineno}"  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "marshal", "shelve"):
                    problems.append(f"{where(node)}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in ("pickle", "cPickle", "_pickle", "dill", "marshal", "shelve"):
                problems.append(f"{where(node)}: from {node.module} import ...")
            if mod == "yaml" and any(a.name in ("load", "unsafe_load", "full_load", "load_all", "UnsafeLoader",
                                                "FullLoader", "Loader") for a in node.names):
                problems.append(f"{where(node)}: from yaml import unsafe name")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                problems.append(f"{where(node)}: from torch import load (unscannable)")
        elif isinstance(node, ast.Attribute) and _dotted(node) in (
                "yaml.UnsafeLoader", "yaml.FullLoader", "yaml.Loader", "yaml.unsafe_load", "yaml.full_load",
                "yaml.unsafe_load_all", "yaml.full_load_all", "yaml.load_all"):
            problems.append(f"{where(node)}: {_dotted(node)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads", "marshal.load"):
                problems.append(f"{where(node)}: {name}(")
            elif name == "yaml.load":
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if not (isinstance(loader, ast.Name) and loader.id == "_UniqueKeyLoader"):
                    problems.append(f"{where(node)}: yaml.load without Loader=_UniqueKeyLoader")
            elif name == "torch.load":
                if not _is_const(_kw(node, "weights_only"), True):
                    problems.append(f"{where(node)}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                if not _is_const(_kw(node, "allow_pickle"), False):
                    problems.append(f"{where(node)}: {name} without allow_pickle=False")
    return problems


def test_static_scan_finds_no_unsafe_deserialisation():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in _scan(f)]
    assert problems == []


def test_static_scan_catches_bad_code(tmp_path):
    """The scanner itself works, multi-line calls included."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport yaml, torch, numpy as np\n"
                   "x = torch.load(\n    'f',\n    map_location='cpu',\n)\n"
                   "y = torch.load('f', weights_only=False)\n"
                   "z = yaml.load(s, Loader=yaml.Loader)\nw = yaml.full_load(s)\nv = np.load('a.npz')\n"
                   "u = pickle.loads(b'')\n")
    global PKG
    old, PKG = PKG, tmp_path
    try:
        problems = _scan(bad)
    finally:
        PKG = old
    text = "\n".join(problems)
    for needle in ("import pickle", "torch.load without", "yaml.load without", "yaml.full_load",
                   "np.load without", "pickle.loads("):
        assert needle in text
    assert sum("torch.load without" in p for p in problems) == 2
    good = tmp_path / "good.py"
    good.write_text("import torch, yaml, numpy as np\n"
                    "x = torch.load(\n    'f',\n    map_location='cpu',\n    weights_only=True,\n)\n"
                    "y = yaml.load(s, Loader=_UniqueKeyLoader)\nv = np.load('a.npz', allow_pickle=False)\n")
    PKG = tmp_path
    try:
        assert _scan(good) == []
    finally:
        PKG = old


# -- malicious payloads --------------------------------------------------------------------------------

class _Evil:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"format": 1, "payload": _Evil(marker)})


def _torch_pickle_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": 1, "payload": _Evil(marker)}, buf)
    return buf.getvalue()


def _sanity_payload_works(tmp_path):
    """Make sure the payloads really would create the marker when unpickled unsafely."""
    m1, m2 = tmp_path / "sanity1", tmp_path / "sanity2"
    pickle.loads(_pickle_bytes(m1))
    torch.load(io.BytesIO(_torch_pickle_bytes(m2)), weights_only=False)
    assert m1.exists() and m2.exists()


def test_payloads_are_real(tmp_path):
    _sanity_payload_works(tmp_path)


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _out(result) -> str:
    return result.output + (getattr(result, "stderr", "") or "")


# -- trained runs (built once per module, copied per test) ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("template") / "run"
    r = make_tiny_recipe()
    r["checkpoint"] = {"every_steps": 6, "keep_last": 3}
    Trainer(load_recipe(r), run, quiet=True).fit()
    assert len(list_checkpoints(run / "checkpoints")) >= 2
    assert (run / "checkpoints" / "final" / WEIGHTS).is_file()
    return run


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("template") / "snap"
    r = make_tiny_recipe()
    r["phases"] = [{"name": "cyc", "steps": 12, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05},
                    "schedule": [{"name": "cosine_restarts", "cycles": 2}]}]
    r["methods"] = [{"name": "snapshot_ensemble"}]
    Trainer(load_recipe(r), run, quiet=True).fit()
    assert len(snapshot_files(run)) == 2
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def _unfinish(run: Path) -> None:
    """Make a finished run look interrupted (so resume/eval go through the step checkpoints)."""
    shutil.rmtree(run / "checkpoints" / "final")
    (run / "summary.json").unlink(missing_ok=True)


# -- 2. malicious pickles on every load path -----------------------------------------------------------

@pytest.mark.parametrize("make", [_pickle_bytes, _torch_pickle_bytes], ids=["pickle", "torch.save"])
def test_malicious_state_pt_from_run_dir(tiny_run, tmp_path, make):
    run = _copy(tiny_run, tmp_path)
    marker = tmp_path / "PWNED"
    newest = list_checkpoints(run / "checkpoints")[-1]
    (newest / STATE).write_bytes(make(marker))
    with pytest.raises(DojoError):
        load_checkpoint(newest)
    assert not marker.exists()
    try:
        trainer = Trainer.from_run_dir(run, quiet=True)
    except Exception:
        pass        # refused
    else:           # a fallback to an older, good checkpoint is acceptable
        assert trainer.checkpoint_step is not None
        assert trainer.checkpoint_step < int(newest.name.split("-")[1])
    assert not marker.exists()


@pytest.mark.parametrize("make", [_pickle_bytes, _torch_pickle_bytes], ids=["pickle", "torch.save"])
def test_malicious_state_pt_dojo_resume(tiny_run, tmp_path, make):
    run = _copy(tiny_run, tmp_path)
    _unfinish(run)
    marker = tmp_path / "PWNED"
    for ck in list_checkpoints(run / "checkpoints"):      # every checkpoint poisoned: must refuse
        (ck / STATE).write_bytes(make(marker))
    result = _invoke(["resume", run, "-q"])
    assert result.exit_code != 0, _out(result)
    assert not marker.exists()


def test_malicious_newest_state_pt_dojo_resume(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    _unfinish(run)
    marker = tmp_path / "PWNED"
    (list_checkpoints(run / "checkpoints")[-1] / STATE).write_bytes(_torch_pickle_bytes(marker))
    result = _invoke(["resume", run, "-q"])
    if result.exit_code != 0:
        assert "error:" in _out(result)
    assert not marker.exists()


@pytest.mark.parametrize("make", [_pickle_bytes, _torch_pickle_bytes], ids=["pickle", "torch.save"])
def test_malicious_weights_everywhere(tiny_run, tmp_path, make):
    run = _copy(tiny_run, tmp_path)
    marker = tmp_path / "PWNED"
    # finished run: final weights
    (run / "checkpoints" / "final" / WEIGHTS).write_bytes(make(marker))
    result = _invoke(["eval", run])
    assert result.exit_code != 0, _out(result)
    assert not marker.exists()
    x = np.zeros((2, 8), dtype=np.float32)
    np.savez(tmp_path / "ok.npz", x=x)
    result = _invoke(["predict", run, "--input", tmp_path / "ok.npz"])
    assert result.exit_code != 0, _out(result)
    assert not marker.exists()
    # unfinished run: every checkpoint's weights poisoned
    _unfinish(run)
    for ck in list_checkpoints(run / "checkpoints"):
        (ck / WEIGHTS).write_bytes(make(marker))
        with pytest.raises(DojoError):
            load_checkpoint(ck)
    for args in (["resume", run, "-q"], ["eval", run]):
        result = _invoke(args)
        assert result.exit_code != 0, _out(result)
        assert not marker.exists()


@pytest.mark.parametrize("kind", ["object-array", "raw-pickle"])
def test_malicious_npz_predict(tiny_run, tmp_path, kind):
    run = _copy(tiny_run, tmp_path)
    marker = tmp_path / "PWNED"
    bad = tmp_path / "bad.npz"
    if kind == "object-array":
        np.savez(bad, x=np.array([_Evil(marker), 1], dtype=object))
    else:
        bad.write_bytes(_pickle_bytes(marker))
    result = _invoke(["predict", run, "--input", bad])
    assert result.exit_code != 0, _out(result)
    assert not marker.exists()


@pytest.mark.parametrize("make", [_pickle_bytes, _torch_pickle_bytes], ids=["pickle", "torch.save"])
def test_malicious_snapshot(snapshot_run, tmp_path, make):
    run = _copy(snapshot_run, tmp_path)
    marker = tmp_path / "PWNED"
    snapshot_files(run)[0].write_bytes(make(marker))
    with pytest.raises(Exception):
        Trainer.from_run_dir(run, quiet=True).trained_models()
    assert not marker.exists()
    result = _invoke(["eval", run])
    assert result.exit_code != 0, _out(result)
    assert not marker.exists()
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 8), dtype=np.float32))
    result = _invoke(["predict", run, "--input", tmp_path / "ok.npz"])
    assert result.exit_code != 0, _out(result)
    assert not marker.exists()


def test_clean_runs_still_load(tiny_run, snapshot_run, tmp_path):
    """Control: the unmodified runs evaluate fine (so the refusals above are about the payloads)."""
    for run in (tiny_run, snapshot_run):
        result = _invoke(["eval", _copy(run, tmp_path)])
        assert result.exit_code == 0, _out(result)


# -- 3. YAML recipes -----------------------------------------------------------------------------------

def test_yaml_python_tag_rejected(tmp_path):
    marker = tmp_path / "MARKER"
    f = tmp_path / "evil.yaml"
    f.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nseed: 0\n')
    run = tmp_path / "run"
    result = _invoke(["train", f, "--run-dir", run, "-q"])
    assert result.exit_code == 2, _out(result)
    assert "error:" in _out(result)
    assert not marker.exists() and not run.exists()
    # also as a whole document and through an override
    f.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    result = _invoke(["train", f, "--run-dir", run, "-q"])
    assert result.exit_code == 2 and "error:" in _out(result)
    result = _invoke(["train", "quickstart", f'seed=!!python/object/apply:os.system ["touch {marker}"]',
                      "--run-dir", run, "-q"])
    assert result.exit_code == 2 and "error:" in _out(result)
    assert not marker.exists() and not run.exists()
    with pytest.raises(DojoError):
        parse_yaml(f'!!python/object/new:os.system ["touch {marker}"]', "x")
    assert not marker.exists()


def test_yaml_duplicate_keys_rejected(tmp_path):
    with pytest.raises(DojoError, match="duplicate"):
        parse_yaml("a: 1\nb: 2\na: 3\n", "x")
    with pytest.raises(DojoError, match="duplicate"):
        parse_yaml("outer:\n  k: 1\n  k: 2\n", "x")
    f = tmp_path / "dup.yaml"
    f.write_text(json.dumps(make_tiny_recipe())[:-1] + ', "seed": 5}\n')   # JSON is YAML: seed twice
    run = tmp_path / "run"
    result = _invoke(["train", f, "--run-dir", run, "-q"])
    assert result.exit_code == 2 and "error:" in _out(result)
    assert "duplicate" in _out(result)
    assert not run.exists()


def test_unknown_key_rejected_before_anything_is_built(tmp_path):
    r = make_tiny_recipe()
    r["phases"][0]["optimizer"]["learning_rate"] = 0.1
    f = tmp_path / "unknown.yaml"
    f.write_text(json.dumps(r) + "\n")
    run = tmp_path / "run"
    result = _invoke(["train", f, "--run-dir", run, "-q"])
    assert result.exit_code == 2 and "error:" in _out(result), _out(result)
    assert not run.exists()
    r = make_tiny_recipe()
    r["bogus"] = 1
    f.write_text(json.dumps(r) + "\n")
    result = _invoke(["train", f, "--run-dir", run, "-q"])
    assert result.exit_code == 2 and "error:" in _out(result), _out(result)
    assert "bogus" in _out(result)
    assert not run.exists()


# -- 4. safetensors ------------------------------------------------------------------------------------

def test_save_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2))
    model(torch.randn(4, 5))        # non-trivial BN running stats
    path = tmp_path / WEIGHTS
    save_weights(model, path)
    loaded = load_file(str(path))
    sd = model.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def _checkpoint(tiny_run, tmp_path) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(list_checkpoints(tiny_run / "checkpoints")[-1], ck)
    load_checkpoint(ck)             # the untouched copy loads
    return ck


def test_truncated_safetensors_refused(tiny_run, tmp_path):
    ck = _checkpoint(tiny_run, tmp_path)
    data = (ck / WEIGHTS).read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 12, 4, 0):
        (ck / WEIGHTS).write_bytes(data[:cut])
        with pytest.raises(DojoError):
            load_checkpoint(ck)


def test_corrupted_safetensors_header_refused(tiny_run, tmp_path):
    ck = _checkpoint(tiny_run, tmp_path)
    data = (ck / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n]
    variants = [
        data[:8] + b"{" * n + data[8 + n:],                                   # not JSON
        struct.pack("<Q", 2 ** 40) + data[8:],                                # absurd header length
        data[:8] + header.replace(b'"F32"', b'"Q99"', 1) + data[8 + n:],      # unknown dtype
        data[:8] + header.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1) + data[8 + n:],
    ]
    for bad in variants:
        assert bad != data
        (ck / WEIGHTS).write_bytes(bad)
        with pytest.raises(DojoError):
            load_checkpoint(ck)


def test_missing_state_or_weights_refused(tiny_run, tmp_path):
    ck = _checkpoint(tiny_run, tmp_path)
    (ck / STATE).write_bytes(b"not a torch file")
    with pytest.raises(DojoError):
        load_checkpoint(ck)
    (ck / WEIGHTS).unlink()
    with pytest.raises(DojoError):
        load_checkpoint(ck)
