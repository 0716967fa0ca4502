"""`dojo calibrate`: the fitted temperature equals fit_temperature on the run's validation logits, the
files it writes, and `dojo eval` / `dojo predict` / `trained_models` using it afterwards."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from torchdojo import Trainer, load_recipe
from torchdojo.calibrate import TemperatureScaled
from torchdojo.calibration import fit_temperature
from torchdojo.cli import main
from torchdojo.data.builtin import synthetic_tabular

from conftest import make_tiny_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def overtrained_recipe() -> dict:
    """Adam at a high LR, no weight decay, 50 epochs on 280 rows: overconfident on held-out data.
    Two cosine cycles with snapshot_ensemble, so the run also has an "ensemble" model."""
    r = make_tiny_recipe()
    r["name"] = "overtrained"
    r["model"] = {"name": "mlp", "hidden": [64]}
    r["phases"] = [{"name": "main", "steps": 400, "batch_size": 32,
                    "optimizer": {"name": "adam", "lr": 0.03, "weight_decay": 0.0},
                    "schedule": [{"name": "cosine_restarts", "cycles": 2}]}]
    r["methods"] = [{"name": "snapshot_ensemble"}]
    r["log"] = {"every_steps": 50}
    r["checkpoint"] = {"every_epochs": None}
    return r


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def raw_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """The final weights' logits, computed without trained_models or the command."""
    trainer = Trainer.from_run_dir(run_dir, quiet=True)
    model = trainer.state.model
    model.load_state_dict(load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors")))
    model.eval()
    with torch.no_grad():
        return model(x).double()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("calibrate") / "run"
    Trainer(load_recipe(overtrained_recipe()), run_dir, quiet=True).fit()
    data = Trainer.from_run_dir(run_dir, quiet=True).state.data
    logits = {s: raw_logits(run_dir, data.split(s).x) for s in ("val", "test")}
    labels = {s: data.split(s).y for s in ("val", "test")}
    return run_dir, logits, labels


@pytest.fixture(scope="module")
def calibrated(run):
    run_dir, logits, labels = run
    # A stale calibration: the command must refit on the raw model and replace it.
    (run_dir / "calibration.json").write_text(json.dumps({"method": "temperature_scaling", "temperature": 50.0}))
    res = invoke("calibrate", run_dir)
    assert res.exit_code == 0, res.output
    data = json.loads((run_dir / "calibration.json").read_text())
    return run_dir, logits, labels, data, res


def test_calibrate_fits_the_temperature_of_the_val_logits(calibrated):
    run_dir, logits, labels, data, res = calibrated
    expected = fit_temperature(logits["val"], labels["val"])
    assert expected > 1.2                                       # the run is overconfident, as intended
    assert data["method"] == "temperature_scaling"
    assert data["temperature"] == pytest.approx(expected, rel=1e-5)
    assert data["split"] == "val" and data["n_samples"] == len(labels["val"]) and data["n_bins"] == 15
    before, after = data["before"], data["after"]
    assert before["nll"] == pytest.approx(F.cross_entropy(logits["val"], labels["val"]).item(), rel=1e-5)
    assert after["nll"] == pytest.approx(F.cross_entropy(logits["val"] / expected, labels["val"]).item(), rel=1e-5)
    assert after["nll"] <= before["nll"]
    assert set(before) == set(after) == {"accuracy", "nll", "ece", "brier"}
    assert (run_dir / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    assert f"temperature T = {data['temperature']:.4g}" in res.stdout
    for word in ("ece", "nll", "brier", "accuracy", "val (fit) before", "test after"):
        assert word in res.stdout


def test_calibration_keeps_the_test_accuracy(calibrated):
    _, logits, labels, data, _ = calibrated
    test = data["other_splits"]["test"]
    accuracy = (logits["test"].argmax(1) == labels["test"]).double().mean().item()
    assert test["before"]["accuracy"] == test["after"]["accuracy"] == pytest.approx(accuracy)
    assert data["before"]["accuracy"] == data["after"]["accuracy"]
    t = data["temperature"]
    assert test["after"]["nll"] == pytest.approx(F.cross_entropy(logits["test"] / t, labels["test"]).item(), rel=1e-5)


def test_trained_models_wraps_every_model_unless_asked_for_the_raw_ones(calibrated):
    run_dir, logits, _, data, _ = calibrated
    trainer = Trainer.from_run_dir(run_dir, quiet=True)
    x = trainer.state.data.val.x
    scaled = trainer.trained_models()
    assert set(scaled) == {"", "ensemble"}
    assert all(isinstance(m, TemperatureScaled) and m.temperature == data["temperature"] for m in scaled.values())
    raw = Trainer.from_run_dir(run_dir, quiet=True).trained_models(calibrated=False)
    assert not any(isinstance(m, TemperatureScaled) for m in raw.values())
    with torch.no_grad():
        for name in raw:
            assert torch.allclose(scaled[name](x), raw[name](x) / data["temperature"])
        assert torch.allclose(raw[""](x).double(), logits["val"], atol=1e-5)


def _row(output: str, name: str) -> float:
    """The first value of a metric's row in a printed metrics table."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == name:
            return float(cells[1])
    raise AssertionError(f"no row {name!r} in:\n{output}")


def test_eval_reports_the_calibrated_nll_and_the_same_accuracy(calibrated):
    run_dir, logits, labels, data, _ = calibrated
    res = invoke("eval", run_dir, "--split", "test")
    assert res.exit_code == 0, res.output
    assert "calibrated probabilities" in res.stderr and "calibration.json" in res.stderr
    t = data["temperature"]
    z, y = logits["test"], labels["test"]
    assert _row(res.stdout, "nll") == pytest.approx(F.cross_entropy(z / t, y).item(), rel=1e-3)
    assert _row(res.stdout, "nll") < F.cross_entropy(z, y).item()
    assert _row(res.stdout, "accuracy") == pytest.approx((z.argmax(1) == y).double().mean().item(), rel=1e-3)


def test_predict_gives_the_temperature_scaled_probabilities(calibrated, tmp_path):
    run_dir, _, _, data, _ = calibrated
    spec = overtrained_recipe()["data"]
    x = synthetic_tabular(**{k: v for k, v in spec.items() if k != "name"}).x[:25]
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "pred.csv"
    res = invoke("predict", run_dir, "--input", tmp_path / "x.npz", "--output", out)
    assert res.exit_code == 0, res.output
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    cols = [i for i, h in enumerate(header) if h.startswith("prob_")]
    got = np.array([[float(r[i]) for i in cols] for r in body])
    trainer = Trainer.from_run_dir(run_dir, quiet=True)
    logits = raw_logits(run_dir, trainer.state.data.info.prepare(x))
    expected = torch.softmax(logits / data["temperature"], 1).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert [r[header.index("prediction")] for r in body] == [str(i) for i in logits.argmax(1).tolist()]


def test_calibrate_on_a_regression_run_is_an_error(tmp_path):
    r = make_tiny_recipe()
    r["data"] = {"name": "diabetes"}
    r["task"] = {"name": "regress"}
    r["phases"] = [{"name": "main", "steps": 3, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.01}}]
    Trainer(load_recipe(r), tmp_path / "reg", quiet=True).fit()
    res = invoke("calibrate", tmp_path / "reg")
    assert res.exit_code == 2
    assert "error:" in res.stderr and "classification" in res.stderr
    assert not (tmp_path / "reg" / "calibration.json").exists()


def test_calibrate_without_a_final_model_is_an_error(run, tmp_path):
    run_dir = tmp_path / "unfinished"
    shutil.copytree(run[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "final")
    (run_dir / "calibration.json").unlink(missing_ok=True)
    res = invoke("calibrate", run_dir)
    assert res.exit_code == 2
    assert "error:" in res.stderr and "no final model" in res.stderr
    assert not (run_dir / "calibration.json").exists()
    # Not even a checkpoint: the trainer's own error, still exit 2.
    shutil.rmtree(run_dir / "checkpoints")
    res = invoke("calibrate", run_dir)
    assert res.exit_code == 2 and "error:" in res.stderr


def test_a_broken_calibration_file_is_reported(calibrated, tmp_path):
    run_dir = tmp_path / "broken"
    shutil.copytree(calibrated[0], run_dir)
    (run_dir / "calibration.json").write_text(json.dumps({"method": "temperature_scaling", "temperature": -1}))
    res = invoke("eval", run_dir)
    assert res.exit_code == 2
    assert "error:" in res.stderr and "calibration.json" in res.stderr and "dojo calibrate" in res.stderr
    # calibrate itself reads only the raw model, so it repairs the file.
    res = invoke("calibrate", run_dir, "--bins", "10")
    assert res.exit_code == 0, res.output
    data = json.loads((run_dir / "calibration.json").read_text())
    assert data["temperature"] == pytest.approx(calibrated[3]["temperature"], rel=1e-9)
    assert data["n_bins"] == 10
