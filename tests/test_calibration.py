"""Calibration metrics and temperature scaling (torchdojo.calibration) against hand computations,
scikit-learn and the invariants of Guo et al. 2017 (arXiv 1706.04599)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchdojo.calibration import (
    MAX_TEMPERATURE, MIN_TEMPERATURE, TemperatureScaling, apply_temperature, brier_score, calibration_bins,
    calibration_metrics, expected_calibration_error, fit_temperature, nll, reliability_diagram,
)


def sampled_set(n: int, k: int = 10, scale: float = 2.5, seed: int = 0):
    """True logits and labels drawn from softmax(true logits): perfectly calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.fixture(scope="module")
def calibrated():
    return sampled_set(8000)


# A hand-made example with 4 classes. Confidences (largest probabilities) and whether the argmax is
# the label:
#   0.3, 0.3           -> one right, one wrong
#   0.5, 0.5, 0.6      -> all wrong
#   0.9 (five times)   -> all right
ROWS = [([0.3, 0.25, 0.25, 0.2], 0), ([0.3, 0.25, 0.25, 0.2], 1),
        ([0.5, 0.3, 0.1, 0.1], 2), ([0.1, 0.5, 0.2, 0.2], 0), ([0.2, 0.1, 0.6, 0.1], 3)] + \
       [([0.9, 0.05, 0.03, 0.02], 0)] * 5
HAND_PROBS = torch.tensor([r[0] for r in ROWS], dtype=torch.float64)
HAND_LABELS = torch.tensor([r[1] for r in ROWS])


# ------------------------------------------------------------------------------------------------ ECE

def test_ece_hand_computed_three_bins():
    # Bins [0, 1/3], (1/3, 2/3], (2/3, 1]: counts 2, 3, 5; accuracy 1/2, 0, 1; confidence 0.3, 1.6/3, 0.9.
    bins = calibration_bins(HAND_PROBS, HAND_LABELS, n_bins=3)
    assert bins.counts.tolist() == [2, 3, 5]
    assert bins.accuracy.tolist() == pytest.approx([0.5, 0.0, 1.0], abs=1e-15)
    assert bins.confidence.tolist() == pytest.approx([0.3, 1.6 / 3, 0.9], abs=1e-15)
    assert bins.edges.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=0)
    # ECE = 2/10 * |0.5 - 0.3| + 3/10 * |0 - 1.6/3| + 5/10 * |1 - 0.9| = 0.04 + 0.16 + 0.05
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=3) == pytest.approx(0.25, abs=1e-12)


def test_ece_hand_computed_two_bins_edge_goes_to_lower_bin():
    # Bins [0, 0.5], (0.5, 1]: the two confidences of exactly 0.5 belong to the first bin.
    # bin 0: 0.3, 0.3, 0.5, 0.5 -> accuracy 1/4, confidence 0.4
    # bin 1: 0.6, 0.9 x 5       -> accuracy 5/6, confidence 0.85
    bins = calibration_bins(HAND_PROBS, HAND_LABELS, n_bins=2)
    assert bins.counts.tolist() == [4, 6]
    expected = 4 / 10 * abs(0.25 - 0.4) + 6 / 10 * abs(5 / 6 - 0.85)    # 0.06 + 0.01
    assert expected == pytest.approx(0.07, abs=1e-12)
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(expected, abs=1e-12)
    # The edge is compared in the input's precision: float32 0.6 and 0.8 sit on the edges 3/5 and 4/5
    # (although both are slightly above the float64 values); lists of Python floats are float64.
    for probs in (torch.tensor([[0.6, 0.4], [0.8, 0.2]]), [[0.6, 0.4], [0.8, 0.2]],
                  np.array([[0.6, 0.4], [0.8, 0.2]], dtype=np.float32)):
        assert calibration_bins(probs, [0, 1], n_bins=5).counts.tolist() == [0, 0, 1, 1, 0]


def test_ece_of_overconfident_predictions():
    # Always 80% confident in class 0, right half of the time: one filled bin, ECE = |0.5 - 0.8|.
    probs = torch.tensor([[0.8, 0.2]] * 10)
    labels = torch.tensor([0, 1] * 5)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3, abs=1e-6)
    # numpy arrays and lists are accepted as well
    assert expected_calibration_error(probs.numpy(), labels.numpy().tolist()) == pytest.approx(0.3, abs=1e-6)


def test_ece_near_zero_for_labels_sampled_from_the_predictions():
    logits, labels = sampled_set(50_000, seed=1)
    assert expected_calibration_error(torch.softmax(logits, 1), labels) < 0.02
    # ... and clearly positive once the same predictions are made overconfident
    assert expected_calibration_error(torch.softmax(2 * logits, 1), labels) > 0.1


def test_calibration_bins_sum_to_n(calibrated):
    logits, labels = calibrated
    for n_bins in (1, 7, 15, 100):
        bins = calibration_bins(torch.softmax(logits, 1), labels, n_bins)
        assert bins.counts.numel() == n_bins and bins.edges.numel() == n_bins + 1
        assert int(bins.counts.sum()) == bins.n_samples == len(labels)
        filled = bins.counts > 0
        assert torch.isnan(bins.accuracy[~filled]).all() and torch.isnan(bins.confidence[~filled]).all()
        # Every sample's confidence lies in its bin, so the bin means do too.
        assert (bins.confidence[filled] > bins.edges[:-1][filled]).all()
        assert (bins.confidence[filled] <= bins.edges[1:][filled]).all()
        # Count-weighted bin accuracy is the overall accuracy.
        acc = (logits.argmax(1) == labels).double().mean()
        weighted = (bins.counts[filled] * bins.accuracy[filled]).sum() / len(labels)
        assert float(weighted) == pytest.approx(float(acc), abs=1e-12)
    d = json.loads(json.dumps(calibration_bins(torch.softmax(logits, 1), labels, 100).to_dict()))
    assert sum(d["counts"]) == len(labels) and None in d["accuracy"]


# ------------------------------------------------------------------------------------------------ NLL, Brier

def test_nll_matches_cross_entropy_and_sklearn(calibrated):
    from sklearn.metrics import log_loss

    logits, labels = calibrated
    probs = torch.softmax(logits, 1)
    expected = F.cross_entropy(logits, labels).item()
    assert nll(logits, labels) == pytest.approx(expected, rel=1e-12)
    assert nll(logits, labels, kind="logits") == pytest.approx(expected, rel=1e-12)
    assert nll(probs, labels) == pytest.approx(expected, rel=1e-9)            # auto: read as probabilities
    assert nll(probs, labels, kind="probs") == pytest.approx(expected, rel=1e-9)
    assert nll(probs.numpy(), labels.numpy(), kind="probs") == pytest.approx(
        log_loss(labels.numpy(), probs.numpy(), labels=list(range(10))), rel=1e-9)
    # one-hot rows: "auto" reads probabilities, kind="logits" forces log_softmax
    onehot = torch.eye(3)
    assert nll(onehot, [0, 1, 2]) == 0.0
    assert nll(onehot, [0, 1, 2], kind="logits") == pytest.approx(-math.log(math.e / (math.e + 2)))
    assert nll(onehot, [1, 1, 1], kind="probs") == pytest.approx(-2 / 3 * math.log(1e-12))


def test_brier_score_hand_computed_and_sklearn():
    from sklearn.metrics import brier_score_loss

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    labels = torch.tensor([0, 2])
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.4^2 + 0.4^2 + 0.8^2) / 2 = (0.14 + 0.96) / 2
    assert brier_score(probs, labels) == pytest.approx(0.55, abs=1e-6)
    assert brier_score(torch.eye(4), torch.arange(4)) == 0.0
    assert brier_score(torch.eye(4), torch.tensor([1, 2, 3, 0])) == 2.0
    assert brier_score(torch.full((5, 4), 0.25), torch.arange(5) % 4) == pytest.approx(1 - 1 / 4)

    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(200, 5, generator=g, dtype=torch.float64), 1)
    y = torch.randint(0, 5, (200,), generator=g)
    peer = brier_score_loss(y.numpy(), p.numpy(), labels=list(range(5)), scale_by_half=False)
    assert brier_score(p, y) == pytest.approx(peer, rel=1e-12)
    # Two classes: twice the binary mean (p_1 - y)^2, as documented.
    p2 = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    y2 = torch.tensor([0, 1, 1])
    assert brier_score(p2, y2) == pytest.approx(2 * float(((p2[:, 1] - y2) ** 2).mean()), rel=1e-12)


def test_calibration_metrics(calibrated):
    logits, labels = calibrated
    m = calibration_metrics(logits, labels)
    probs = torch.softmax(logits, 1)
    assert m == pytest.approx({"accuracy": float((logits.argmax(1) == labels).double().mean()),
                               "nll": nll(logits, labels), "ece": expected_calibration_error(probs, labels),
                               "brier": brier_score(probs, labels)}, rel=1e-12)


def test_bad_input_is_a_clear_value_error():
    logits, labels = sampled_set(20, k=3)
    cases = [
        (lambda: expected_calibration_error(logits, labels), "softmax"),                # logits, not probs
        (lambda: expected_calibration_error(torch.softmax(logits, 1), labels + 3), "must lie in"),
        (lambda: expected_calibration_error(torch.softmax(logits, 1), labels[:5]), "5 entries"),
        (lambda: expected_calibration_error(torch.rand(10), torch.zeros(10)), "torch.stack"),
        (lambda: expected_calibration_error(torch.softmax(logits, 1), labels, n_bins=0), "n_bins"),
        (lambda: brier_score(torch.empty(0, 3), torch.empty(0, dtype=torch.long)), "empty"),
        (lambda: nll(torch.tensor([[0.0, math.nan]]), [0]), "finite"),
        (lambda: nll(logits, labels, kind="scores"), "kind"),
        (lambda: calibration_bins(torch.softmax(logits, 1), labels.double() + 0.5), "integer"),
        (lambda: fit_temperature(torch.empty(0, 5), torch.empty(0, dtype=torch.long)), "empty"),
        (lambda: fit_temperature([], []), "empty"),
        (lambda: fit_temperature(logits, labels, max_iter=0), "max_iter"),
        (lambda: apply_temperature(logits, 0.0), "temperature"),
        (lambda: apply_temperature(logits, -2), "temperature"),
        (lambda: TemperatureScaling(math.inf), "temperature"),
    ]
    for fn, words in cases:
        with pytest.raises(ValueError, match=words):
            fn()


# ------------------------------------------------------------------------------------------------ temperature

@pytest.mark.parametrize("t0", [0.5, 2.0, 3.0])
def test_fit_temperature_recovers_a_known_temperature(calibrated, t0):
    logits, labels = calibrated
    observed = logits * t0                  # softmax(observed / t0) is the distribution the labels came from
    t = fit_temperature(observed, labels)
    assert t == pytest.approx(t0, rel=0.05)
    assert nll(apply_temperature(observed, t), labels) <= nll(observed, labels)
    # float32 logits on the way in give the same answer
    assert fit_temperature(observed.float(), labels) == pytest.approx(t, rel=1e-3)


def test_fit_temperature_leaves_calibrated_logits_alone(calibrated):
    logits, labels = calibrated
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(1.0, rel=0.05)
    assert nll(apply_temperature(logits, t), labels) <= nll(logits, labels)


def test_fitting_never_increases_nll():
    cases = [sampled_set(500, k=k, scale=s, seed=seed) for seed, (k, s) in enumerate([(2, 0.5), (3, 4.0), (10, 1.0)])]
    cases.append((torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), torch.tensor([1, 0, 1])))   # all wrong
    cases.append((torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])))   # tiny set
    for logits, labels in cases:
        t = fit_temperature(logits, labels)
        assert MIN_TEMPERATURE <= t <= MAX_TEMPERATURE
        assert nll(apply_temperature(logits, t), labels, kind="logits") <= nll(logits, labels, kind="logits") + 1e-12


def test_all_correct_set_warns_and_stays_bounded():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]).repeat(5, 1)
    labels = torch.arange(3).repeat(5)
    with pytest.warns(UserWarning, match="classified correctly"):
        t = fit_temperature(logits, labels)
    assert MIN_TEMPERATURE <= t < 1.0
    assert nll(apply_temperature(logits, t), labels, kind="logits") < nll(logits, labels, kind="logits")


def test_temperature_scaling_keeps_the_argmax_and_accuracy(calibrated):
    logits, labels = calibrated
    observed = logits * 2.0
    t = fit_temperature(observed, labels)
    for temperature in (t, 0.01, 0.3, 7.0, 500.0):
        scaled = apply_temperature(observed, temperature)
        assert scaled.shape == observed.shape and scaled.dtype == observed.dtype
        assert torch.equal(scaled.argmax(1), observed.argmax(1))
    before = calibration_metrics(observed, labels)
    after = calibration_metrics(apply_temperature(observed, t), labels)
    assert after["accuracy"] == before["accuracy"]
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] and after["brier"] < before["brier"]


def test_fit_temperature_inside_no_grad_and_inference_mode(calibrated):
    logits, labels = calibrated
    expected = fit_temperature(logits * 2, labels)
    with torch.no_grad():
        assert fit_temperature(logits * 2, labels) == expected
    with torch.inference_mode():
        made_here = logits * 2                                    # an inference tensor
        assert fit_temperature(made_here, labels) == expected
    assert not logits.requires_grad


def test_temperature_scaling_dataclass_round_trip(calibrated):
    logits, labels = calibrated
    ts = TemperatureScaling.fit(logits * 3, labels)
    assert ts.temperature == pytest.approx(3.0, rel=0.05)
    text = json.dumps(ts.to_dict())
    assert json.loads(text) == {"method": "temperature_scaling", "temperature": ts.temperature}
    back = TemperatureScaling.from_dict(json.loads(text))
    assert back == ts
    assert torch.equal(back(logits), logits / ts.temperature)
    assert torch.allclose(back.probs(logits), torch.softmax(logits / ts.temperature, 1))
    assert torch.equal(apply_temperature(logits, back), back(logits))
    # extra keys (metrics stored alongside) are fine; a wrong method or temperature is not
    assert TemperatureScaling.from_dict({"temperature": 2, "nll_before": 1.3}).temperature == 2.0
    assert TemperatureScaling(np.float32(1.5)).temperature == 1.5
    assert TemperatureScaling(torch.tensor(2.0)) == TemperatureScaling(2.0)
    for bad in ({"method": "vector_scaling", "temperature": 2.0}, {"method": "temperature_scaling"},
                {"temperature": 0}, {"temperature": "2"}, [2.0]):
        with pytest.raises(ValueError):
            TemperatureScaling.from_dict(bad)


# ------------------------------------------------------------------------------------------------ plot

def _read_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_reliability_diagram_writes_png(tmp_path, calibrated):
    logits, labels = calibrated
    observed = logits * 2.0
    before = torch.softmax(observed, 1)
    after = torch.softmax(apply_temperature(observed, fit_temperature(observed, labels)), 1)

    single = reliability_diagram(before, labels, tmp_path / "plots" / "single.png", title="overconfident")
    assert single["ece"] == pytest.approx(expected_calibration_error(before, labels), rel=1e-12)
    img = _read_png(tmp_path / "plots" / "single.png")
    assert img.shape[0] > 300 and img.shape[1] > 300
    colors = np.unique((img[..., :3].reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colors) > 20                                       # drawn, not a blank canvas

    pair = reliability_diagram(before, labels, tmp_path / "pair.png", n_bins=10, probs_after=after,
                               names=("uncalibrated", "temperature-scaled"))
    assert pair["ece_after"] < pair["ece"]
    img2 = _read_png(tmp_path / "pair.png")
    assert img2.shape[1] > 1.5 * img.shape[1]                     # two columns side by side

    with pytest.raises(ValueError, match="same samples"):
        reliability_diagram(before, labels, tmp_path / "bad.png", probs_after=after[:, :5].softmax(1))
