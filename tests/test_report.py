"""`dojo report`: which plots a run's report has and omits, that report.html is self-contained, that
the confusion matrix counts are the model's, and that the page renders in a headless browser."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from torchdojo import Trainer, load_recipe
from torchdojo.calibrate import calibrate
from torchdojo.report import grad_norm_grid, named_model_metrics, phase_starts, read_run, report_command, write_report

from conftest import make_tiny_recipe

IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]*)\"")
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")


def img_ids(page: str) -> set[str]:
    return set(re.findall(r"<img\b[^>]*\bid=\"img-([^\"]+)\"", page))


def section_ids(page: str) -> set[str]:
    return set(re.findall(r"<section id=\"([^\"]+)\"", page))


def report(run_dir: Path, *args) -> str:
    res = CliRunner().invoke(report_command, [str(run_dir), *args])
    assert res.exit_code == 0, res.output
    return (run_dir / "report.html").read_text(encoding="utf-8")


def tiny(name: str, **changes) -> dict:
    r = make_tiny_recipe()
    r.update(name=name, checkpoint={"every_epochs": None}, log={"every_steps": 1, "tensorboard": False}, **changes)
    return r


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """Classification with a 2-cycle snapshot ensemble in the first phase and diagnostics every 4 steps."""
    r = tiny("cls", methods=[{"name": "snapshot_ensemble", "phase": "warm"}, {"name": "diagnostics", "every_steps": 4}])
    r["phases"][0]["schedule"] = [{"name": "cosine_restarts", "cycles": 2}]
    run_dir = tmp_path_factory.mktemp("report") / "cls"
    Trainer(load_recipe(r), run_dir, quiet=True).fit()
    return run_dir


@pytest.fixture(scope="module")
def cls_report(cls_run):
    """The report before `dojo calibrate`, and the PNG files written with it."""
    page = report(cls_run)
    return page, {p.stem for p in (cls_run / "report").glob("*.png")}


@pytest.fixture(scope="module")
def calibrated_report(cls_run, cls_report):
    calibrate(cls_run)
    return report(cls_run)


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "reg"
    Trainer(load_recipe(tiny("reg", data={"name": "diabetes"}, task={"name": "regress"})), run_dir, quiet=True).fit()
    report(run_dir)
    return run_dir


PARAMS = ["body.0.weight", "body.0.bias", "head.weight"]


@pytest.fixture(scope="module")
def diag_dir(tmp_path_factory):
    """A run directory written by hand: a failed run with diag/* lines, events and a torn line."""
    run_dir = tmp_path_factory.mktemp("report") / "diag"
    run_dir.mkdir()
    lines = []
    for step in range(1, 13):
        phase = "warm" if step <= 6 else "main"
        loss = math.inf if step == 3 else 2.0 / step                 # written as Infinity: not plotted
        lines.append({"step": step, "epoch": step / 4, "phase": phase, "train/loss": loss,
                      "lr/group0": 0.1 * step, "lr/group1": 0.01})
        if step % 2 == 0:
            diag = {"step": step, "epoch": step / 4, "phase": phase}
            for i, p in enumerate(PARAMS):
                diag[f"diag/grad_norm/{p}"] = 10.0 ** (i - step / 6)
                diag[f"diag/update_ratio/{p}"] = 1e-3 * (i + 1)
                diag[f"diag/weight_norm/{p}"] = 1.0 + i
            if step == 4:
                diag["diag/update_ratio/head.weight"] = math.nan
            if step >= 8:                               # a parameter first seen late; a zero norm
                diag["diag/grad_norm/late.bias"] = 0.0 if step == 8 else 0.5
            diag.update({"diag/dead_relu/body.1": step / 24, "diag/saturation/body.3": 0.1,
                         "diag/samples_per_sec": 1000.0 + step, "diag/peak_memory_mb": 300.0})
            lines.append(diag)
        if step % 4 == 0:
            lines.append({"step": step, "epoch": step / 4, "phase": phase, "val/loss": 1.5 / step,
                          "val/accuracy": step / 13, "val/f1_macro": None})
    lines.insert(9, {"step": 4, "phase": "warm", "event": "rollback", "nonfinite_step": 5, "lr_factor": 0.5})
    lines.append({"event": "odd event without a step"})
    text = "\n".join(json.dumps(e) for e in lines) + "\n" + '{"step": 13, "train/lo'   # torn last line
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "summary.json").write_text(json.dumps({
        "recipe": "handmade", "status": "failed", "steps": 12, "metrics": {}, "wall_seconds": 75.5,
        "error": "RuntimeError: <boom> & friends"}))
    report(run_dir)
    return run_dir


CLS_PLOTS = {"loss", "metric_accuracy", "metric_f1_macro", "metric_ece", "lr", "confusion_matrix", "models",
             "grad_norm_heatmap", "update_ratio", "dead_relu", "weight_norm", "throughput"}
REG_PLOTS = {"loss", "metric_mse", "metric_mae", "metric_r2", "lr", "pred_vs_true"}
DIAG_PLOTS = {"loss", "metric_accuracy", "lr", "grad_norm_heatmap", "update_ratio", "dead_relu", "saturation",
              "weight_norm", "throughput"}


def test_classification_report_has_its_plots(cls_report):
    page, pngs = cls_report
    ids = img_ids(page)
    assert CLS_PLOTS <= ids
    assert "reliability" not in ids and "pred_vs_true" not in ids     # no calibration.json yet
    assert "metric_nll" not in ids                                     # the same numbers as the loss
    assert {"metrics", "curves", "lr", "diagnostics", "confusion", "models", "recipe"} <= section_ids(page)
    assert "reliability" not in section_ids(page)
    assert pngs == ids
    assert ">cls</h1>" in page and 'class="status finished"' in page
    assert 'id="final-metrics"' in page and "ensemble/accuracy" in page
    assert "cosine_restarts" in page                                   # the recipe, in a <pre>


def test_calibrated_run_gets_a_reliability_diagram(cls_run, calibrated_report):
    assert "reliability" in img_ids(calibrated_report)
    assert "reliability" in section_ids(calibrated_report)
    assert (cls_run / "report" / "reliability.png").is_file()
    t = json.loads((cls_run / "calibration.json").read_text())["temperature"]
    assert f"T = {t:.4g}" in calibrated_report


def test_regression_report_omits_what_it_lacks(reg_run):
    page = (reg_run / "report.html").read_text()
    ids = img_ids(page)
    assert REG_PLOTS <= ids
    for absent in ("confusion_matrix", "reliability", "grad_norm_heatmap", "models", "update_ratio", "dead_relu"):
        assert absent not in ids
    assert not {"confusion", "reliability", "diagnostics", "models"} & section_ids(page)
    assert {p.stem for p in (reg_run / "report").glob("*.png")} == ids
    assert "<h2></h2>" not in page and not re.search(r"<section id=\"[^\"]+\"><h2>[^<]*</h2></section>", page)


def test_handmade_diag_run(diag_dir):
    notes: list[str] = []
    assert write_report(diag_dir, notes=notes) == diag_dir / "report.html"      # the Python function
    assert notes == ["metrics.jsonl: 1 unreadable line(s) skipped"]
    page = (diag_dir / "report.html").read_text()
    ids = img_ids(page)
    assert DIAG_PLOTS <= ids
    assert not {"confusion_matrix", "reliability", "models", "recipe"} & (ids | section_ids(page))
    assert 'class="status failed"' in page
    assert "RuntimeError: &lt;boom&gt; &amp; friends" in page                  # escaped
    assert 'id="events"' in page and "rollback" in page and "lr_factor=0.5" in page
    assert "1 unreadable line(s)" in page
    assert "1 min 16 s" in page                                               # wall time


def test_grad_norm_grid_rows_columns_and_phases(diag_dir):
    run = read_run(diag_dir)
    params, steps, grid = grad_norm_grid(run)
    assert params == PARAMS + ["late.bias"]                                   # first-seen order
    assert steps == [2, 4, 6, 8, 10, 12]
    assert grid[1][2] == pytest.approx(10.0 ** (1 - 1.0))
    assert all(math.isnan(v) for v in grid[3][:3]) and grid[3][3] == 0.0
    assert phase_starts(run) == [(0.5, "warm"), (6.5, "main")]


def test_phase_starts_of_a_trained_run(cls_run):
    assert phase_starts(read_run(cls_run)) == [(0.5, "warm"), (18.5, "settle")]


def test_named_models_are_not_per_class_metrics():
    metrics = {"test/accuracy": 0.9, "test/recall/0": 0.8, "test/ensemble/accuracy": 0.95,
               "test/ensemble/recall/0": 0.7, "test/swa/accuracy": 0.91}
    assert named_model_metrics(metrics) == ("test", "accuracy", {"main model": 0.9, "ensemble": 0.95, "swa": 0.91})
    assert named_model_metrics({"test/accuracy": 0.9, "test/recall/0": 0.8}) is None
    assert named_model_metrics({"test/mse": 2.0, "test/r2": 0.5, "test/ensemble/r2": 0.6})[1] == "r2"


@pytest.mark.parametrize("which", ["cls_run", "reg_run", "diag_dir"])
def test_report_is_self_contained(which, request):
    if which == "cls_run":
        request.getfixturevalue("calibrated_report")          # the report with the most plots
    run_dir = request.getfixturevalue(which)
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"(?i)(https?|file|ftp)://", page)
    assert not re.search(r"(?i)<script|<link|<iframe|<object|<embed|@import|url\(", page)
    assert all(href.startswith("#") for href in re.findall(r"href=\"([^\"]*)\"", page))
    srcs = re.findall(r"\bsrc=\"([^\"]*)\"", page)
    assert srcs and len(srcs) == len(IMG_SRC.findall(page)) == len(list((run_dir / "report").glob("*.png")))
    files = {p.read_bytes() for p in (run_dir / "report").glob("*.png")}
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data in files                       # the same bytes as the PNG in report/
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.format == "PNG" and image.width > 50 and image.height > 50
        assert np.asarray(image.convert("L")).std() > 1         # not a blank canvas


def test_confusion_matrix_counts_match_sklearn(cls_run, cls_report):
    page, _ = cls_report
    from sklearn.metrics import confusion_matrix

    trainer = Trainer.from_run_dir(cls_run, quiet=True)
    model = trainer.trained_models()[""]
    test = trainer.state.data.split("test")
    with torch.no_grad():
        pred = model(test.x).argmax(1)
    k = trainer.state.data.info.num_outputs
    expected = confusion_matrix(test.y.numpy(), pred.numpy(), labels=list(range(k)))
    table = re.search(r"<table class=\"counts\" id=\"confusion-counts\">(.*?)</table>", page).group(1)
    rows = re.findall(r"<tr><th>([^<]*)</th>((?:<td>\d+</td>)+)</tr>", table)
    assert [name for name, _ in rows] == [str(c) for c in trainer.state.data.info.class_names]
    counts = np.array([[int(c) for c in re.findall(r"<td>(\d+)</td>", cells)] for _, cells in rows])
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == len(test.y)


def test_command_quiet_errors_and_stale_files(cls_run, cls_report, tmp_path):
    stale = cls_run / "report" / "old-plot.png"
    stale.write_bytes(b"stale")
    res = CliRunner().invoke(report_command, [str(cls_run), "--quiet"])
    assert res.exit_code == 0 and res.output == ""
    assert not stale.exists()
    res = CliRunner().invoke(report_command, [str(tmp_path)])
    assert res.exit_code == 2 and "error:" in res.output and "not a run directory" in res.output


def test_checkpoint_only_and_model_less_runs(tmp_path, cls_run):
    """Without a final model the test-split plots come from the latest checkpoint; without either, the
    curves are still shown and the test-split plots are skipped with a note."""
    run_dir = tmp_path / "copy"
    shutil.copytree(cls_run, run_dir, ignore=shutil.ignore_patterns("final", "report*", "calibration.json"))
    page = report(run_dir)
    assert "confusion_matrix" in img_ids(page) and "checkpoint at step 22" in page
    shutil.rmtree(run_dir / "checkpoints")
    page = report(run_dir)
    assert "loss" in img_ids(page) and "confusion_matrix" not in img_ids(page)
    assert not (run_dir / "report" / "confusion_matrix.png").exists()
    assert 'id="notes"' in page and "neither a final model nor a checkpoint" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium at /usr/bin/chromium or on PATH for the browser check")
def test_report_renders_in_headless_chromium(cls_run, calibrated_report, reg_run, diag_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            for run_dir in (cls_run, reg_run, diag_dir):
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                errors, requests = [], []
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("request", lambda req: requests.append(req.url))
                page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
                widths = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
                assert widths and all(done and w > 0 for done, w in widths), (run_dir, widths)
                assert len(widths) == len(list((run_dir / "report").glob("*.png")))
                shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB"))
                assert shot.std() > 10, "the screenshot is blank"
                colours = shot[::4, ::4].astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
                assert len(np.unique(colours)) > 16
                assert errors == [], errors
                # The page itself, then only data: URIs (the images): nothing else is fetched.
                assert all(u.startswith(("file://", "data:")) for u in requests), requests
                assert sum(u.startswith("file://") for u in requests) == 1, requests
                page.close()
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------- unsupervised runs

AE_RECIPE = {"name": "ae", "seed": 0, "data": {"name": "mnist1d", "num_samples": 1000},
             "model": {"name": "autoencoder", "encoder": {"name": "mlp", "hidden": [32]}, "latent": 4, "decoder": [32]},
             "task": {"name": "autoencode", "noise": [{"name": "noise", "std": 0.3}]},
             "phases": [{"epochs": 2, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 3e-3}}]}


def _unsupervised_recipe(which: str) -> dict:
    r = json.loads(json.dumps(AE_RECIPE))
    r["name"] = which
    if which == "vae":                                   # sequences (MNIST-1D), variational
        r["model"]["variational"] = True
        r["task"] = {"name": "vae"}
    elif which == "ae_image":                            # 8x8 digits through a CNN encoder
        r["data"] = {"name": "digits"}
        r["model"]["encoder"] = {"name": "cnn", "channels": [8], "hidden": 16}
        r["task"] = {"name": "autoencode"}
        r["phases"][0]["epochs"] = 1
    elif which == "ae_table":                            # the tiny recipe's standardised table
        r["data"] = make_tiny_recipe()["data"]
        r["phases"][0]["epochs"] = 1
    return r


@pytest.fixture(scope="module")
def unsupervised_runs(tmp_path_factory):
    """Autoencoder runs (denoising on sequences, VAE, images, a table), each with its report."""
    root = tmp_path_factory.mktemp("report-ae")
    runs = {}
    for which in ("ae", "vae", "ae_image", "ae_table"):
        run_dir = root / which
        Trainer(load_recipe(_unsupervised_recipe(which)), run_dir, quiet=True).fit()
        runs[which] = run_dir, report(run_dir)
    return runs


UNSUPERVISED_CURVES = {"ae": {"loss", "lr", "metric_denoise_mse"}, "vae": {"loss", "lr", "metric_recon", "metric_kl",
                                                                         "metric_mse"},
                       "ae_image": {"loss", "lr"}, "ae_table": {"loss", "lr"}}


@pytest.mark.parametrize("which", ["ae", "vae", "ae_image", "ae_table"])
def test_unsupervised_report_shows_reconstructions(which, unsupervised_runs):
    """The outputs are reconstructions, not class logits: no confusion matrix (the data has classes), a
    reconstruction figure instead, captioned with the test split's MSE; every image a real PNG."""
    run_dir, page = unsupervised_runs[which]
    ids, sections = img_ids(page), section_ids(page)
    assert "reconstructions" in ids and "reconstructions" in sections
    assert "Reconstructions (test split)" in page
    assert not {"confusion_matrix", "pred_vs_true", "reliability"} & ids
    assert not {"confusion", "pred-vs-true", "reliability"} & sections and "confusion-counts" not in page
    assert UNSUPERVISED_CURVES[which] <= ids
    assert {p.stem for p in (run_dir / "report").glob("*.png")} == ids
    assert 'id="notes"' not in page
    # The caption's test-split MSE is the task's own test/mse (the reconstruction of the clean input).
    caption = re.search(r"over these 6 samples, ([0-9.e+-]+) over the test split \((\d+) samples\)", page)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert float(caption.group(1)) == pytest.approx(summary["metrics"]["test/mse"], rel=1e-3)
    assert int(caption.group(2)) == Trainer.from_run_dir(run_dir, quiet=True).state.data.info.sizes["test"]
    assert ("standardised" in page) == (which == "ae_table")
    image = Image.open(run_dir / "report" / "reconstructions.png")
    image.load()
    assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert np.asarray(image.convert("L")).std() > 1
    for src in re.findall(r"\bsrc=\"([^\"]*)\"", page):
        assert src.startswith("data:image/png;base64,")
        inline = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        inline.load()
        assert inline.format == "PNG" and np.asarray(inline.convert("L")).std() > 1


def test_plot_reconstructions_draws_each_kind(tmp_path):
    from torchdojo.report import plot_reconstructions

    rng = np.random.default_rng(0)
    cases = {"rgb": ((4, 3, 12, 12), "image"), "grey": ((1, 2, 8, 8), "image"), "seq": ((6, 3, 30), "sequence"),
             "table": ((5, 7), "tabular"), "one_row": ((1, 30), "tabular")}
    for name, (shape, kind) in cases.items():
        x = rng.normal(size=shape)
        path = plot_reconstructions(x, 0.5 * x, kind, tmp_path / f"{name}.png", name,
                                    feature_names=[f"f{i}" for i in range(shape[-1])])
        image = Image.open(path)
        image.load()
        assert image.format == "PNG" and image.width > 100 and np.asarray(image.convert("L")).std() > 1, name


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium at /usr/bin/chromium or on PATH for the browser check")
def test_unsupervised_report_renders_in_headless_chromium(unsupervised_runs):
    from playwright.sync_api import sync_playwright

    run_dir, _ = unsupervised_runs["ae_image"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
            size = page.evaluate("(i => [i.complete, i.naturalWidth])(document.getElementById('img-reconstructions'))")
            assert size[0] and size[1] > 0
            assert errors == []
        finally:
            browser.close()
