"""Tasks: classification and regression metrics against scikit-learn, training loss and predict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, f1_score, log_loss, mean_absolute_error, mean_squared_error,
                             r2_score)
from torch import nn

from torchdojo.data import DataInfo, Split, TensorLoader
from torchdojo.losses import CrossEntropy, MSE
from torchdojo.registry import TASKS
from torchdojo.tasks import Classify, LossTerm, Regress
from torchdojo.tasks.classify import macro_f1


def class_info(k: int, names=None) -> DataInfo:
    return DataInfo(task_type="classification", kind="tabular", input_shape=[k], num_outputs=k,
                    class_names=names if names is not None else [str(i) for i in range(k)])


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> TensorLoader:
    return TensorLoader(Split(x, y), batch_size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classify_metrics_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 300, 5
    logits = torch.randn(n, k, generator=g) * 2
    y = torch.randint(0, k, (n,), generator=g)
    logits[y == 0, 0] += 2.0                  # some signal, so metrics are not all near chance
    metrics = Classify().evaluate(nn.Identity(), loader(logits, y, batch_size=64), class_info(k))
    probs = torch.softmax(logits.double(), 1).numpy()
    pred = logits.argmax(1).numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y.numpy(), pred), abs=1e-12)
    assert metrics["f1_macro"] == pytest.approx(f1_score(y.numpy(), pred, average="macro"), abs=1e-12)
    assert metrics["nll"] == pytest.approx(log_loss(y.numpy(), probs, labels=list(range(k))), rel=1e-5)
    assert metrics["loss"] == metrics["nll"]


def test_macro_f1_counts_absent_classes_as_zero_like_sklearn_with_all_labels():
    target = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    k = 4                                     # class 3 appears in neither
    expected = f1_score(target.numpy(), pred.numpy(), labels=list(range(k)), average="macro", zero_division=0)
    assert macro_f1(pred, target, k) == pytest.approx(expected, abs=1e-12)
    assert macro_f1(target, target, 3) == 1.0


def test_classify_training_loss_weights_terms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    model = nn.Identity()
    single, parts = Classify().training_loss(model, {"x": x, "y": y}, [LossTerm("cross_entropy", 1.0, CrossEntropy())])
    assert single.item() == pytest.approx(nn.functional.cross_entropy(x, y).item(), rel=1e-6)
    assert list(parts) == ["cross_entropy"]
    terms = [LossTerm("cross_entropy", 0.3, CrossEntropy()),
             LossTerm("cross_entropy2", 0.7, CrossEntropy(label_smoothing=0.2))]
    total, parts = Classify().training_loss(model, {"x": x, "y": y}, terms)
    ce = nn.functional.cross_entropy(x, y)
    ls = nn.functional.cross_entropy(x, y, label_smoothing=0.2)
    assert total.item() == pytest.approx((0.3 * ce + 0.7 * ls).item(), rel=1e-6)
    assert parts["cross_entropy"].item() == pytest.approx(0.3 * ce.item(), rel=1e-6)
    assert parts["cross_entropy2"].item() == pytest.approx(0.7 * ls.item(), rel=1e-6)
    assert not parts["cross_entropy"].requires_grad


@pytest.mark.parametrize("targets", [1, 2])
def test_regress_metrics_in_original_units_match_sklearn(targets):
    rng = np.random.default_rng(targets)
    n = 200
    y_orig = rng.normal(50.0, 12.0, size=(n, targets))
    pred_orig = y_orig + rng.normal(0.0, 4.0, size=(n, targets))
    mean, std = y_orig.mean(0) + 1.0, y_orig.std(0) * 1.1   # as fitted on some train split
    info = DataInfo(task_type="regression", kind="tabular", input_shape=[targets], num_outputs=targets,
                    y_mean=mean.tolist(), y_std=std.tolist())
    y_std_units = torch.tensor((y_orig - mean) / std, dtype=torch.float32)
    out_std_units = torch.tensor((pred_orig - mean) / std, dtype=torch.float32)
    if targets == 1:
        y_std_units = y_std_units[:, 0]       # single targets are stored as (N,)
    metrics = Regress().evaluate(nn.Identity(), loader(out_std_units, y_std_units, 64), info)
    assert metrics["mse"] == pytest.approx(mean_squared_error(y_orig, pred_orig), rel=1e-4)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y_orig, pred_orig), rel=1e-4)
    assert metrics["r2"] == pytest.approx(r2_score(y_orig, pred_orig), rel=1e-4)
    # The loss stays in standardised units: the training objective.
    std_mse = float(((out_std_units.double() - y_std_units.double().reshape(out_std_units.shape)) ** 2).mean())
    assert metrics["loss"] == pytest.approx(std_mse, rel=1e-6)
    assert metrics["mse"] == pytest.approx(np.mean(((pred_orig - y_orig) ** 2)), rel=1e-4)
    assert metrics["mse"] > 5 * metrics["loss"]        # original units are on a much larger scale


def test_regress_training_loss_reshapes_outputs():
    out = torch.randn(16, 1)
    y = torch.randn(16)
    loss, parts = Regress().training_loss(nn.Identity(), {"x": out, "y": y}, [LossTerm("mse", 1.0, MSE())])
    assert loss.item() == pytest.approx(((out[:, 0] - y) ** 2).mean().item(), rel=1e-6)


def test_classify_predict_probabilities_and_class_names():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 3, generator=g) * 3
    names = ["cat", "dog", "emu"]
    cols = Classify().predict(nn.Identity(), logits, class_info(3, names))
    assert list(cols) == ["prediction", "prob_cat", "prob_dog", "prob_emu"]
    probs = np.array([cols[f"prob_{c}"] for c in names]).T
    assert probs.shape == (20, 3)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), rtol=1e-6)
    assert cols["prediction"] == [names[i] for i in logits.argmax(1).tolist()]
    # Without class names, classes are numbered.
    cols = Classify().predict(nn.Identity(), logits, class_info(3, names=[]))
    assert list(cols) == ["prediction", "prob_0", "prob_1", "prob_2"]
    assert set(cols["prediction"]) <= {"0", "1", "2"}


def test_regress_predict_in_original_units():
    info = DataInfo(task_type="regression", kind="tabular", input_shape=[1], num_outputs=1,
                    y_mean=[10.0], y_std=[2.0])
    cols = Regress().predict(nn.Identity(), torch.tensor([[0.0], [1.0], [-2.5]]), info)
    assert cols == {"prediction": pytest.approx([10.0, 12.0, 5.0])}
    info2 = DataInfo(task_type="regression", kind="tabular", input_shape=[2], num_outputs=2,
                     y_mean=[0.0, 100.0], y_std=[1.0, 10.0])
    cols = Regress().predict(nn.Identity(), torch.tensor([[1.0, 1.0]]), info2)
    assert cols == {"prediction_0": pytest.approx([1.0]), "prediction_1": pytest.approx([110.0])}


def test_tasks_registered():
    assert {"classify", "regress"} <= set(TASKS.names())
    assert TASKS.get("classify").factory.task_type == "classification"
    assert TASKS.get("regress").factory.task_type == "regression"
