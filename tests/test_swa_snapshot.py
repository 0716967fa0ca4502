"""Weight averaging and ensembles: torchdojo.ensemble (combine, Ensemble), SWA (swa_update,
recompute_bn, the `swa` method) and snapshot ensembles (`snapshot_ensemble`: snapshots at the cosine
cycle ends, ensemble metrics in the summary, `dojo eval`, `dojo predict`, exact resume mid-cycle)."""
from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from torchdojo import ConfigError, Trainer
from torchdojo.cli import main as dojo_main
from torchdojo.data import TensorLoader
from torchdojo.ensemble import Ensemble, combine, default_how
from torchdojo.log import fmt
from torchdojo.methods import Method, recompute_bn, swa_update
from torchdojo.models.mlp import MLP, MLPConfig
from torchdojo.registry import METHODS, MODELS

from conftest import make_tiny_recipe
from helpers import assert_same_weights, comparable, fit, read_metrics

TRAIN_ROWS = 280            # the tiny recipe's data: 400 rows, 10 % val, 20 % test


# -- a probe method (registered under a name of its own for this module only) ------------------------

PROBE = "swa_snapshot_probe"


class WeightsProbe(Method):
    """Records, after every optimizer step, where the trainer is, the LR and the weights, and how many
    snapshot files the run directory holds at that moment."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_step_end(self, state) -> None:
        folder = state.run_dir / "checkpoints" / "snapshots" if state.run_dir is not None else None
        self.steps.append({
            "step": state.step, "phase": state.phase_name, "step_in_phase": state.step_in_phase,
            "batch_in_epoch": state.batch_in_epoch, "steps_per_epoch": state.steps_per_epoch,
            "phase_steps": state.phase_steps, "lr": state.optimizer.param_groups[0]["lr"],
            "weights": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
            "snapshot_files": len(list(folder.glob("snapshot-*.safetensors"))) if folder and folder.is_dir() else 0})


@pytest.fixture(scope="module", autouse=True)
def probe_registered():
    METHODS.register(PROBE, WeightsProbe)
    yield
    METHODS.unregister(PROBE)


def probe_of(trainer: Trainer) -> WeightsProbe:
    return next(m for m in trainer.methods if isinstance(m, WeightsProbe))


# -- helpers --------------------------------------------------------------------------------------

def fresh_model(trainer: Trainer, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A model of the run's architecture with `weights`, in eval mode."""
    info = trainer.state.data.info
    model = MODELS.build(trainer.recipe.model, "model", input_shape=tuple(info.input_shape),
                         num_outputs=info.num_outputs)
    model.load_state_dict(weights)
    return model.eval()


def bn_input_stats(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and unbiased variance of what `layer` receives when `model` runs on all of x (eval
    mode, float64)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double()))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was_training)
    handle.remove()
    inputs = torch.cat(seen)
    return inputs.mean(0), inputs.var(0, unbiased=True)


def bn_model(hidden=(16,), seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP((8,), 3, MLPConfig(hidden=list(hidden), batch_norm=True))


# -- torchdojo.ensemble ---------------------------------------------------------------------------

def _outputs(n_models: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g) * 3 for _ in range(n_models)]


def test_combine_mean_prob_is_log_of_mean_softmax():
    outs = _outputs()
    want = torch.log(torch.stack([torch.softmax(o.double(), -1) for o in outs]).mean(0))
    got = combine(outs, "mean_prob")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # Already a log-distribution: probabilities sum to 1.
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(6), rtol=1e-6, atol=1e-6)


def test_combine_mean_logprob_is_normalised_geometric_mean():
    outs = _outputs()
    probs = torch.stack([torch.softmax(o.double(), -1) for o in outs])
    geo = probs.prod(0) ** (1 / len(outs))
    want = torch.log(geo / geo.sum(-1, keepdim=True))
    torch.testing.assert_close(combine(outs, "mean_logprob").double(), want, rtol=1e-5, atol=1e-5)
    # Differs from the arithmetic mean of probabilities (unless all members agree).
    assert not torch.allclose(combine(outs, "mean_logprob"), combine(outs, "mean_prob"), atol=1e-3)


def test_combine_mean_is_plain_average_and_single_member_cases():
    outs = _outputs(n_models=4)
    torch.testing.assert_close(combine(outs, "mean"), torch.stack(outs).mean(0))
    (one,) = _outputs(n_models=1)
    torch.testing.assert_close(combine([one], "mean_prob"), torch.log_softmax(one, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine([one], "mean_logprob"), torch.log_softmax(one, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine([one], "mean"), one)
    # Half-precision members are combined in float32.
    half = [o.half() for o in outs]
    assert combine(half, "mean_prob").dtype == torch.float32
    torch.testing.assert_close(combine(half, "mean_prob"), combine([h.float() for h in half], "mean_prob"))
    with pytest.raises(ValueError, match="nothing to combine"):
        combine([], "mean_prob")
    with pytest.raises(ValueError, match="unknown combination"):
        combine(outs, "median")
    assert default_how("classification") == "mean_prob" and default_how("regression") == "mean"


@pytest.mark.parametrize("how", ["mean_prob", "mean_logprob", "mean"])
def test_ensemble_forward_combines_members(how):
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
    ens = Ensemble(members, how)
    assert list(ens.members) == members and sum(1 for _ in ens.parameters()) == 12
    x = torch.randn(7, 5)
    with torch.no_grad():
        out = ens(x)
        torch.testing.assert_close(out, combine([m(x) for m in members], how))
        if how != "mean":
            # Log-probabilities already: log_softmax leaves them unchanged, softmax is exp.
            torch.testing.assert_close(torch.log_softmax(out, -1), out, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(torch.softmax(out, -1), out.exp(), rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(out, torch.stack([m(x) for m in members]).mean(0))


# -- swa_update, recompute_bn --------------------------------------------------------------------------

def test_swa_update_is_the_running_mean_of_the_weights():
    average = bn_model(seed=100)                             # its own weights are forgotten on update 0
    sets = [bn_model(seed=s) for s in range(5)]
    for m in sets:                                           # give the buffers distinct values too
        m.body[1][1].running_mean.normal_()
    for k, model in enumerate(sets):
        swa_update(average, model, k)
        params = list(zip(*[list(m.parameters()) for m in sets[:k + 1]]))
        for a, group in zip(average.parameters(), params):
            torch.testing.assert_close(a, torch.stack(group).mean(0), rtol=1e-6, atol=1e-7)
        # Buffers are copied from the latest model (BatchNorm is recomputed at the end instead).
        for a, b in zip(average.buffers(), model.buffers()):
            assert torch.equal(a, b)
    # After 5 updates with 5 really different sets, the average is none of them.
    assert not any(torch.allclose(average.head.weight, m.head.weight) for m in sets)


def _train_like_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """The batches SWA's BatchNorm update feeds (256 rows at a time: 256 + 24 for the train split)."""
    from torchdojo.data.bundle import Split
    return [b["x"] for b in TensorLoader(Split(x, torch.zeros(len(x))), batch_size=256)]


def test_recompute_bn_gives_exact_mean_and_unbiased_variance_over_all_batches():
    torch.manual_seed(1)
    model = bn_model()
    bn = model.body[1][1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    x = torch.randn(TRAIN_ROWS, 8) * 2 + 1
    batches = _train_like_batches(x)
    assert [len(b) for b in batches] == [256, 24]
    mean, var = bn_input_stats(model, bn, x)           # BN's input (a Linear output) does not depend on BN
    recompute_bn(model, batches)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recompute_bn_is_exact_when_the_mean_dwarfs_the_spread(dtype):
    """Mean 1e5, std 1e-2 in batches of different sizes: sum(x^2) - n*mean^2 loses every digit there
    (1.8 % off); the merged two-pass statistics equal torch's mean and unbiased var of all rows."""
    g = torch.Generator().manual_seed(3)
    x = (1e5 + 1e-2 * torch.randn(1000, 4, generator=g, dtype=torch.float64)).to(dtype)
    bn = nn.BatchNorm1d(4, dtype=dtype)
    recompute_bn(bn, list(torch.split(x, [256, 256, 256, 200, 30, 2])))
    mean, var = x.double().mean(0), x.double().var(0)       # unbiased, as BatchNorm keeps running_var
    assert float(var.min()) > 0.5e-4 and float(var.max()) < 2e-4   # the data's spread survives float32
    if dtype == torch.float64:
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-15, atol=0)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-9, atol=0)
    else:
        torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-7, atol=0)     # within one ulp
        torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-6, atol=0)


def test_recompute_bn_equals_batchnorm_own_statistics_over_one_pass():
    """Ordinary data: BatchNorm with momentum=None over one batch of all the rows keeps exactly their
    mean and unbiased variance; recompute_bn over the same rows in uneven batches gives the same."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 3, 5, generator=g) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1) + torch.tensor(
        [0.5, -2.0, 10.0]).view(1, 3, 1)
    own = nn.BatchNorm1d(3, momentum=None).train()
    own(x)
    ours = nn.BatchNorm1d(3)
    ours.running_mean.fill_(7.0)
    ours.running_var.fill_(7.0)
    recompute_bn(ours, list(torch.split(x, [128, 128, 44])))
    torch.testing.assert_close(ours.running_mean, own.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var, own.running_var, rtol=1e-5, atol=1e-6)


def test_recompute_bn_single_pass_resets_old_statistics_and_restores_momentum_and_mode():
    torch.manual_seed(2)
    model = bn_model(hidden=(16, 16))
    norms = [model.body[1][1], model.body[2][1]]
    for bn in norms:
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)
        bn.momentum = 0.3
    x = torch.randn(100, 8)
    seen = {id(bn): [] for bn in norms}
    handles = [bn.register_forward_pre_hook(lambda m, args: seen[id(m)].append(args[0].detach().double()))
               for bn in norms]
    model.eval()
    recompute_bn(model, [x])                 # one batch with every row
    for h in handles:
        h.remove()
    for bn in norms:
        inputs = torch.cat(seen[id(bn)])     # what the layer saw in the pass (deeper layers: train mode)
        torch.testing.assert_close(bn.running_mean.double(), inputs.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), inputs.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.3
        assert int(bn.num_batches_tracked) == 1
    assert not model.training                # the mode it had before
    # A model without BatchNorm is left alone.
    plain = nn.Linear(3, 2)
    before = copy.deepcopy(plain.state_dict())
    recompute_bn(plain, [torch.randn(4, 3)])
    assert_same_weights(plain.state_dict(), before)


# -- the swa method in a recipe -------------------------------------------------------------------------

SWA_SPE = TRAIN_ROWS // 64                    # 4 steps per epoch in the SWA phase


def swa_recipe(swa_phase: dict | None = None) -> dict:
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16], "batch_norm": True}
    r["phases"] = [
        {"name": "main", "steps": 10, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}},
        swa_phase or {"name": "swa", "epochs": 3, "batch_size": 64,
                      "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    ]
    r["methods"] = [{"name": "swa"}, {"name": PROBE}]
    return r


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory, probe_registered):
    run_dir = tmp_path_factory.mktemp("swa") / "run"
    trainer, summary = fit(swa_recipe(), run_dir)
    return run_dir, trainer, summary


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_swa_final_weights_are_the_mean_of_the_epoch_end_weights(swa_run):
    run_dir, trainer, summary = swa_run
    steps = probe_of(trainer).steps
    swa_steps = [s for s in steps if s["phase"] == "swa"]
    assert len(swa_steps) == 3 * SWA_SPE and summary["steps"] == 10 + 3 * SWA_SPE
    # The epoch ends of the SWA phase, found from the step counter alone.
    ends = [s for s in swa_steps if s["step_in_phase"] % SWA_SPE == 0]
    assert [s["step_in_phase"] for s in ends] == [4, 8, 12]
    final = load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))
    swa = trainer.methods[0]
    assert swa.n_averaged == 3
    for name in _param_names(trainer.state.model):
        want = torch.stack([s["weights"][name] for s in ends]).mean(0)
        torch.testing.assert_close(final[name], want, rtol=1e-6, atol=1e-7)
    # The average is really different from the last weights (the SWA phase moved the weights).
    assert not torch.allclose(final["head.weight"], swa_steps[-1]["weights"]["head.weight"], atol=1e-4)


def test_swa_final_batchnorm_statistics_are_recomputed_exactly(swa_run):
    run_dir, trainer, _ = swa_run
    final = load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))
    model = fresh_model(trainer, final)
    bn = model.body[1][1]
    mean, var = bn_input_stats(model, bn, trainer.state.data.train.x)
    # Not the statistics of the last training batch or the running average of training.
    last = probe_of(trainer).steps[-1]["weights"]
    assert not torch.allclose(final["body.1.1.running_mean"], last["body.1.1.running_mean"], atol=1e-4)
    torch.testing.assert_close(final["body.1.1.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final["body.1.1.running_var"].double(), var, rtol=1e-5, atol=1e-6)


def test_swa_summary_metrics_are_those_of_the_averaged_model(swa_run):
    run_dir, trainer, summary = swa_run
    final = load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))
    model = fresh_model(trainer, final)
    for split in ("val", "test"):
        data = trainer.state.data.split(split)
        with torch.no_grad():
            logits = model(data.x)
        acc = (logits.argmax(1) == data.y).double().mean().item()
        nll = F.cross_entropy(logits, data.y).item()
        assert summary["metrics"][f"{split}/accuracy"] == acc
        assert summary["metrics"][f"{split}/nll"] == pytest.approx(nll, rel=1e-6)
    # The last validation of training measured the raw model; the summary's val is the average's.
    last_val = [e for e in read_metrics(run_dir) if "val/loss" in e and "test/loss" not in e][-1]
    assert last_val["val/loss"] != summary["metrics"]["val/loss"]


def test_swa_averages_at_the_last_step_of_a_phase_that_ends_mid_epoch():
    trainer, summary = fit(swa_recipe({"name": "swa", "steps": 10, "batch_size": 64,
                                       "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}), None)
    swa_steps = [s for s in probe_of(trainer).steps if s["phase"] == "swa"]
    points = [s for s in swa_steps if s["step_in_phase"] in (4, 8, 10)]   # 2 epoch ends + the last step
    swa = trainer.methods[0]
    assert swa.n_averaged == 3
    final = swa.average.state_dict()
    for name in _param_names(trainer.state.model):
        torch.testing.assert_close(final[name], torch.stack([s["weights"][name] for s in points]).mean(0),
                                   rtol=1e-6, atol=1e-7)


# -- snapshot ensembles -----------------------------------------------------------------------------

PRE_STEPS, WARM, CYCLE_STEPS, CYCLES = 5, 3, 7, 3
CYC_STEPS = WARM + CYCLE_STEPS * CYCLES                    # 24
CYCLE_ENDS = [WARM + CYCLE_STEPS * (k + 1) for k in range(CYCLES)]    # 10, 17, 24 (steps done in the phase)
SNAP_LR = 0.1
RESUME_AT = 16                                             # global step: step 11 of the phase, mid-cycle 2


def snapshot_recipe() -> dict:
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16], "batch_norm": True}
    r["phases"] = [
        {"name": "pre", "steps": PRE_STEPS, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}},
        {"name": "cyc", "steps": CYC_STEPS, "batch_size": 32,
         "optimizer": {"name": "sgd", "lr": SNAP_LR, "momentum": 0.9},
         "schedule": [{"name": "warmup", "steps": WARM}, {"name": "cosine_restarts", "cycles": CYCLES}]},
    ]
    r["methods"] = [{"name": "snapshot_ensemble"}, {"name": PROBE}]
    r["checkpoint"] = {"every_steps": 4, "every_epochs": 1, "keep_last": 100}
    return r


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, probe_registered):
    run_dir = tmp_path_factory.mktemp("snapshot") / "run"
    trainer, summary = fit(snapshot_recipe(), run_dir)
    return run_dir, trainer, summary


def snapshot_paths(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints" / "snapshots").glob("*.safetensors"))


def test_snapshots_are_written_exactly_at_the_cycle_ends(snapshot_run):
    run_dir, trainer, summary = snapshot_run
    assert trainer.state.schedule.cycle_ends() == CYCLE_ENDS
    paths = snapshot_paths(run_dir)
    assert [p.name for p in paths] == [f"snapshot-{k:02d}.safetensors" for k in range(1, CYCLES + 1)]
    cyc = {s["step_in_phase"]: s for s in probe_of(trainer).steps if s["phase"] == "cyc"}
    assert sorted(cyc) == list(range(1, CYC_STEPS + 1))
    # The k-th file appears right after the step that ends cycle k, and not one step earlier.
    for t, s in cyc.items():
        assert s["snapshot_files"] == sum(end <= t for end in CYCLE_ENDS), t
    pre = [s for s in probe_of(trainer).steps if s["phase"] == "pre"]
    assert all(s["snapshot_files"] == 0 for s in pre)
    for path, end in zip(paths, CYCLE_ENDS):
        snap = load_file(str(path))
        assert_same_weights(snap, cyc[end]["weights"])
        # ...and not the weights of the neighbouring steps.
        assert not torch.equal(snap["head.weight"], cyc[end - 1]["weights"]["head.weight"])
        if end + 1 in cyc:
            assert not torch.equal(snap["head.weight"], cyc[end + 1]["weights"]["head.weight"])


def _restarts_lr(t: int) -> float:
    """The LR of step t (0-based) of the cyc phase: warmup, then 3 cosine cycles from the peak."""
    if t < WARM:
        return SNAP_LR * (t + 1) / WARM
    local = (t - WARM) % CYCLE_STEPS
    return SNAP_LR * 0.5 * (1 + math.cos(math.pi * local / CYCLE_STEPS))


def test_snapshot_run_lr_follows_cosine_restarts(snapshot_run):
    _, trainer, _ = snapshot_run
    cyc = [s for s in probe_of(trainer).steps if s["phase"] == "cyc"]
    for s in cyc:
        assert s["lr"] == pytest.approx(_restarts_lr(s["step_in_phase"] - 1), rel=1e-12, abs=1e-15)
    # Each cycle restarts at the peak right after a snapshot.
    for end in CYCLE_ENDS[:-1]:
        assert cyc[end]["lr"] == pytest.approx(SNAP_LR)


def _ensemble_probs(trainer: Trainer, snapshots: list[dict], x: torch.Tensor) -> torch.Tensor:
    members = [fresh_model(trainer, w) for w in snapshots]
    with torch.no_grad():
        return torch.stack([torch.softmax(m(x).double(), 1) for m in members]).mean(0)


def test_summary_ensemble_metrics_equal_the_ensemble_of_the_snapshot_files(snapshot_run):
    run_dir, trainer, summary = snapshot_run
    snapshots = [load_file(str(p)) for p in snapshot_paths(run_dir)]
    metrics = summary["metrics"]
    for split in ("val", "test"):
        data = trainer.state.data.split(split)
        probs = _ensemble_probs(trainer, snapshots, data.x)
        acc = (probs.argmax(1) == data.y).double().mean().item()
        nll = -torch.log(probs[torch.arange(len(data.y)), data.y]).mean().item()
        assert metrics[f"{split}/ensemble/accuracy"] == acc
        assert metrics[f"{split}/ensemble/nll"] == pytest.approx(nll, rel=1e-5)
        # The same through the library's Ensemble module.
        ens = Ensemble([fresh_model(trainer, w) for w in snapshots]).eval()
        assert trainer.evaluate(split, ens, "ensemble") == {k: v for k, v in metrics.items()
                                                           if k.startswith(f"{split}/ensemble/")}
    # The plain metrics are the final model's, a different model from the ensemble.
    assert {f"test/{m}" for m in ("loss", "nll", "accuracy", "f1_macro")} <= metrics.keys()
    assert metrics["test/ensemble/nll"] != metrics["test/nll"]


def _table_cells(output: str) -> dict[str, list[str]]:
    """Rows of a rich table printed by `dojo eval`: metric name -> the cells after it."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        cells = [c for c in cells if c]
        if len(cells) >= 2:
            rows[cells[0]] = cells[1:]
    return rows


def test_dojo_eval_prints_the_summary_ensemble_metrics(snapshot_run):
    run_dir, _, summary = snapshot_run
    res = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(dojo_main, ["eval", str(run_dir)],
                                                                     catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = _table_cells(res.output)
    assert rows["metric"] == ["test"]
    for name in ("accuracy", "nll", "ensemble/accuracy", "ensemble/nll", "ensemble/f1_macro"):
        assert rows[name] == [fmt(summary["metrics"][f"test/{name}"])], name


def test_dojo_predict_writes_ensemble_probabilities(snapshot_run, tmp_path):
    run_dir, trainer, _ = snapshot_run
    info = trainer.state.data.info
    test = trainer.state.data.test
    # Inputs in the units of the original data (predict standardises them like training did).
    raw = test.x.numpy() * np.asarray(info.x_std, np.float32) + np.asarray(info.x_mean, np.float32)
    np.savez(tmp_path / "in.npz", x=raw)
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(dojo_main, ["predict", str(run_dir), "--input", str(tmp_path / "in.npz"),
                                         "--output", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    classes = info.class_names
    assert list(rows[0]) == (["prediction"] + [f"prob_{c}" for c in classes] + ["ensemble/prediction"]
                             + [f"ensemble/prob_{c}" for c in classes])
    assert len(rows) == len(test)
    probs = np.array([[float(r[f"ensemble/prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # The ensemble columns are the mean of the snapshots' softmax probabilities.
    snapshots = [load_file(str(p)) for p in snapshot_paths(run_dir)]
    want = _ensemble_probs(trainer, snapshots, info.prepare(raw)).numpy()
    np.testing.assert_allclose(probs, want, atol=2e-5)
    assert [r["ensemble/prediction"] for r in rows] == [classes[i] for i in want.argmax(1)]
    single = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(single.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(single, probs, atol=1e-4)


def test_resume_mid_cycle_continues_restarts_and_snapshots_exactly(snapshot_run, tmp_path):
    src, _, ref_summary = snapshot_run
    state = torch.load(src / "checkpoints" / f"step-{RESUME_AT:08d}" / "state.pt", weights_only=True)
    assert state["phase_index"] == 1
    in_phase = state["step_in_phase"]
    assert CYCLE_ENDS[0] < in_phase < CYCLE_ENDS[1]          # between two cycle ends
    assert len(state["methods"][0]["snapshots"]) == 1
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "snapshots")
    shutil.rmtree(run_dir / "checkpoints" / "final")
    (run_dir / "summary.json").unlink()
    trainer = Trainer.from_run_dir(run_dir, quiet=True, checkpoint=run_dir / "checkpoints" / f"step-{RESUME_AT:08d}")
    summary = trainer.fit()
    # The LR sequence after the checkpoint continues the cycles.
    lrs = {e["step"]: e["lr/group0"] for e in read_metrics(run_dir) if "train/loss" in e}
    for step in range(RESUME_AT + 1, PRE_STEPS + CYC_STEPS + 1):
        assert lrs[step] == pytest.approx(_restarts_lr(step - PRE_STEPS - 1), rel=1e-12, abs=1e-15), step
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(src))
    # The snapshots after the checkpoint are written again, numbered on from the restored one, identical;
    # the restored one, whose file was deleted, is written again from the checkpoint (the folder's
    # manifest lists every member of the ensemble, and a folder missing one is refused).
    assert [p.name for p in snapshot_paths(run_dir)] == [f"snapshot-0{k}.safetensors" for k in (1, 2, 3)]
    for p in snapshot_paths(run_dir):
        assert_same_weights(load_file(str(p)), load_file(str(src / "checkpoints" / "snapshots" / p.name)))
    assert_same_weights(load_file(str(run_dir / "checkpoints/final/model.safetensors")),
                        load_file(str(src / "checkpoints/final/model.safetensors")))
    # The ensemble (with the first snapshot restored from the checkpoint) gives the same metrics.
    assert summary["metrics"] == ref_summary["metrics"]


@pytest.mark.parametrize("phase, schedule", [(None, [{"name": "cosine"}]), ("pre", None)])
def test_snapshot_ensemble_needs_cosine_restarts(phase, schedule):
    r = snapshot_recipe()
    r["checkpoint"] = {"every_epochs": None}
    if schedule is not None:
        r["phases"][1]["schedule"] = schedule
    r["methods"] = [{"name": "snapshot_ensemble", **({"phase": phase} if phase else {})}]
    with pytest.raises(ConfigError) as info:
        fit(r, None)
    assert info.value.path == "methods"
    assert "cosine_restarts" in info.value.message
    if phase:
        assert "'pre'" in info.value.message


def test_a_cycle_cut_off_by_the_phase_end_gives_no_snapshot():
    """cosine_restarts with cycle_steps 7 and cycle_mult 2 after a 3-step warmup in a 34-step phase:
    cycles end at phase steps 10 and 24; the third (28 steps) is cut off by the phase after 10 steps, so
    the phase's last step is not a cycle end and takes no snapshot (the LR there is far from its floor)."""
    from types import SimpleNamespace

    from torchdojo.methods import SnapshotEnsemble
    from torchdojo.schedules import compose, cosine_restarts, linear_warmup
    schedule = compose([linear_warmup(steps=3), cosine_restarts(cycle_steps=7, cycle_mult=2)], 34)
    model = nn.Linear(2, 1, bias=False)
    state = SimpleNamespace(phase_name="cyc", schedule=schedule, model=model, run_dir=None, step_in_phase=0)
    method = SnapshotEnsemble()
    method.on_phase_start(state)
    for t in range(1, 35):
        with torch.no_grad():
            model.weight.fill_(t)                        # the weights after step t of the phase
        state.step_in_phase = t
        method.on_step_end(state)
    assert [int(s["weight"][0, 0]) for s in method.snapshots] == [10, 24]
    assert schedule(33) > 0.5
