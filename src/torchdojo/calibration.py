"""Calibration of classifiers: how far predicted confidence is from observed accuracy, and temperature
scaling to correct it.

- Expected calibration error (ECE) over equal-width confidence bins: Naeini, Cooper and Hauskrecht 2015,
  "Obtaining Well Calibrated Probabilities Using Bayesian Binning" (AAAI 2015); Guo, Pleiss, Sun and
  Weinberger 2017, "On Calibration of Modern Neural Networks" (arXiv 1706.04599), section 2.
- Reliability diagrams: DeGroot and Fienberg 1983; drawn as in Guo et al. 2017, figure 1.
- Brier score: Brier 1950, "Verification of forecasts expressed in terms of probability".
- Temperature scaling: Guo et al. 2017 (arXiv 1706.04599), section 4.2: one scalar T > 0 that divides
  all logits, fitted by minimising the NLL on a held-out set. It leaves every argmax (and so the
  accuracy) unchanged.

Every function works on plain tensors in any loop (numpy arrays and nested lists are accepted too):

    from torchdojo.calibration import expected_calibration_error, fit_temperature, apply_temperature
    T = fit_temperature(val_logits, val_labels)                     # on held-out data, not training data
    probs = torch.softmax(apply_temperature(test_logits, T), dim=1)
    expected_calibration_error(probs, test_labels)                  # a float in [0, 1]

Conventions: `probs` is an (N, K) tensor whose rows are probability vectors, `logits` an (N, K)
tensor of unnormalised scores, `labels` an (N,) tensor of class indices in [0, K). A binary
classifier's P(class 1) `p` becomes `torch.stack([1 - p, p], dim=1)`. All metrics are computed in
float64 and returned as Python floats. Bad input raises ValueError saying what is wrong.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CalibrationBins", "TemperatureScaling", "apply_temperature", "brier_score", "calibration_bins",
    "calibration_metrics", "expected_calibration_error", "fit_temperature", "nll", "reliability_diagram",
]

#: fit_temperature's result always lies in [MIN_TEMPERATURE, MAX_TEMPERATURE].
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4


# --------------------------------------------------------------------------------------------- input

def _tensor(x: Any, name: str) -> torch.Tensor:
    try:
        # through numpy, so that Python floats stay float64 (torch.as_tensor would make them float32)
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a tensor, a numpy array or a nested list of numbers: {exc}") from None
    return t.detach()


def _scores(x: Any, name: str) -> torch.Tensor:
    """An (N, K) float64 copy of `x` with N >= 1, K >= 2 and only finite values."""
    t = _tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: it has no samples (shape {tuple(t.shape)})")
    if t.ndim != 2:
        hint = (" For a binary classifier's P(class 1) `p`, pass torch.stack([1 - p, p], dim=1)."
                if t.ndim == 1 else "")
        raise ValueError(f"{name} must have shape (N, K) (samples x classes), got shape {tuple(t.shape)}.{hint}")
    if t.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (columns), got shape {tuple(t.shape)}. "
                         "For a binary classifier's P(class 1) `p`, pass torch.stack([1 - p, p], dim=1).")
    t = t.to(torch.float64)
    bad = ~torch.isfinite(t)
    if bad.any():
        i, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite: {name}[{i}, {k}] is {t[i, k].item()}")
    return t


def _sum_tolerance(dtype: torch.dtype) -> float:
    """How far a row of probabilities may sum from 1: loose enough for probabilities stored in 16 bits."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def _looks_like_probs(t: torch.Tensor, tol: float) -> bool:
    return bool(((t >= -tol) & (t <= 1 + tol)).all() and ((t.sum(1) - 1).abs() <= tol).all())


def _probs(x: Any, name: str = "probs") -> torch.Tensor:
    """(N, K) float64 probabilities: every entry in [0, 1], every row summing to 1 (within rounding)."""
    x = _tensor(x, name)
    dtype = x.dtype
    p = _scores(x, name)
    tol = _sum_tolerance(dtype)
    outside = (p < -tol) | (p > 1 + tol)
    if outside.any():
        i, k = (int(v) for v in outside.nonzero()[0])
        raise ValueError(f"{name} must be probabilities in [0, 1], but {name}[{i}, {k}] is {p[i, k].item():.6g}; "
                         "if these are logits, pass torch.softmax(logits, dim=1)")
    off = (p.sum(1) - 1).abs() > tol
    if off.any():
        i = int(off.nonzero()[0, 0])
        raise ValueError(f"every row of {name} must sum to 1, but row {i} sums to {p[i].sum().item():.6g}; "
                         "if these are logits or scores, pass torch.softmax(logits, dim=1)")
    return p.clamp(0.0, 1.0)


def _labels(y: Any, n: int, k: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """(N,) int64 class indices in [0, K) on `device`."""
    t = _tensor(y, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of class indices of shape ({n},), got shape "
                         f"{tuple(t.shape)} (one-hot labels: pass labels.argmax(1))")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but the predictions have {n} rows")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be integer class indices, got dtype {t.dtype}")
    if t.is_floating_point():
        if not (torch.isfinite(t).all() and (t == t.round()).all()):
            raise ValueError(f"{name} must be integer class indices, got non-integral values")
    t = t.to(device=device, dtype=torch.int64)
    bad = (t < 0) | (t >= k)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must lie in [0, {k - 1}] for {k} classes, but {name}[{i}] is {int(t[i])}")
    return t


def _n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return n_bins


def _temperature(t: Any, name: str = "temperature") -> float:
    if isinstance(t, TemperatureScaling):
        return t.temperature
    if isinstance(t, torch.Tensor) and t.numel() == 1:
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {t!r}")
    return float(t)


# --------------------------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics of the top-1 confidence (the largest probability of each sample).

    Bin b covers confidences in (edges[b], edges[b + 1]] (the first bin also includes 0), with
    edges[b] = b / n_bins. For the samples in bin b: `counts[b]` how many, `accuracy[b]` the fraction
    whose argmax class is the label, `confidence[b]` their mean confidence. Empty bins have accuracy and
    confidence NaN. All are CPU tensors: edges, accuracy and confidence float64, counts int64."""
    edges: torch.Tensor
    counts: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor

    @property
    def n_bins(self) -> int:
        return int(self.counts.numel())

    @property
    def n_samples(self) -> int:
        return int(self.counts.sum())

    def ece(self) -> float:
        """sum_b (|B_b| / N) |acc(B_b) - conf(B_b)| over the non-empty bins."""
        filled = self.counts > 0
        weight = self.counts[filled].double() / self.n_samples
        return float((weight * (self.accuracy[filled] - self.confidence[filled]).abs()).sum())

    def to_dict(self) -> dict[str, list]:
        """Plain lists (NaN as None) for JSON."""
        def clean(t: torch.Tensor) -> list:
            return [None if math.isnan(v) else v for v in t.tolist()]
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "accuracy": clean(self.accuracy), "confidence": clean(self.confidence)}


def calibration_bins(probs: Any, labels: Any, n_bins: int = 15) -> CalibrationBins:
    """Counts, accuracy and mean confidence per equal-width confidence bin (see CalibrationBins).

    The confidence of a sample is its largest probability and its prediction that class (the first
    one on a tie). A confidence exactly on an edge b / n_bins falls in the bin below the edge; the
    comparison is made in the precision of `probs` (a float32 0.6 is on the edge 3/5, although it
    is slightly above the float64 0.6)."""
    probs = _tensor(probs, "probs")
    dtype = probs.dtype if probs.is_floating_point() else torch.float64
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1], p.device)
    n_bins = _n_bins(n_bins)
    conf, pred = p.max(dim=1)
    correct = (pred == y).to(torch.float64)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins     # exactly b / n_bins
    index = torch.bucketize(conf.to(dtype), edges[1:-1].to(device=conf.device, dtype=dtype), right=False)
    counts = torch.bincount(index, minlength=n_bins).cpu()
    hits = torch.bincount(index, weights=correct, minlength=n_bins).cpu()
    conf_sum = torch.bincount(index, weights=conf, minlength=n_bins).cpu()
    filled = counts > 0
    nan = torch.full((n_bins,), math.nan, dtype=torch.float64)
    denom = counts.clamp(min=1).double()
    return CalibrationBins(edges=edges, counts=counts,
                           accuracy=torch.where(filled, hits / denom, nan),
                           confidence=torch.where(filled, conf_sum / denom, nan))


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (Naeini et al. 2015; Guo et al. 2017, eq. 3):

        ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|

    over `n_bins` equal-width confidence bins on [0, 1] (see calibration_bins). 0 is perfectly
    calibrated; the largest possible value is 1. The estimate is biased upwards on small sets: with
    perfectly calibrated predictions it is still above 0, shrinking like sqrt(n_bins / N)."""
    return calibration_bins(probs, labels, n_bins).ece()


def nll(logits_or_probs: Any, labels: Any, *, kind: Literal["auto", "logits", "probs"] = "auto",
        eps: float = 1e-12) -> float:
    """Negative log-likelihood of the labels, mean over samples, in nats (natural log): the
    cross-entropy -mean_i log p_i[y_i].

    `kind` says what the (N, K) input holds: "logits" (log_softmax is applied), "probs" (rows are
    probability vectors; p_i[y_i] is clamped to at least `eps`, so one confident miss costs at most
    -log(eps) = 27.6 nats instead of infinity), or "auto" (the default): probabilities if every entry
    lies in [0, 1] and every row sums to 1, logits otherwise. Pass the kind explicitly when you know
    it: a logit matrix that happens to look like probabilities (e.g. one-hot rows) is read as one."""
    if kind not in ("auto", "logits", "probs"):
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    logits_or_probs = _tensor(logits_or_probs, "logits_or_probs")
    dtype = logits_or_probs.dtype
    if kind == "auto":
        x = _scores(logits_or_probs, "logits_or_probs")
        kind = "probs" if _looks_like_probs(x, _sum_tolerance(dtype)) else "logits"
    if kind == "probs":
        p = _probs(logits_or_probs, "logits_or_probs")
        y = _labels(labels, p.shape[0], p.shape[1], p.device)
        return float(-p.gather(1, y[:, None]).clamp(min=eps).log().mean())
    z = _scores(logits_or_probs, "logits_or_probs")
    y = _labels(labels, z.shape[0], z.shape[1], z.device)
    return float(F.cross_entropy(z, y))


def brier_score(probs: Any, labels: Any) -> float:
    """Multi-class Brier score (Brier 1950): the mean over samples of sum_k (p_k - y_k)^2, with y the
    one-hot label. Lower is better; 0 for confident correct one-hot predictions, 2 at worst, 1 - 1/K
    for the uniform prediction over K classes.

    Normalisation: summed over classes, averaged over samples (Brier's original definition). For two
    classes this is twice the binary form mean (p_1 - y)^2 (scikit-learn's brier_score_loss with its
    default scale_by_half on binary labels); it equals brier_score_loss(..., scale_by_half=False)."""
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1], p.device)
    onehot = F.one_hot(y, p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(1).mean())


def calibration_metrics(logits: Any, labels: Any, n_bins: int = 15) -> dict[str, float]:
    """accuracy, nll, ece and brier of softmax(logits) in one call (names as in metrics.jsonl)."""
    z = _scores(logits, "logits")
    y = _labels(labels, z.shape[0], z.shape[1], z.device)
    p = torch.softmax(z, dim=1)
    return {"accuracy": float((p.argmax(1) == y).double().mean()),
            "nll": nll(z, y, kind="logits"),
            "ece": expected_calibration_error(p, y, n_bins),
            "brier": brier_score(p, y)}


# --------------------------------------------------------------------------------------------- temperature

def apply_temperature(logits: Any, temperature: Any) -> torch.Tensor:
    """logits / T: the temperature-scaled logits, same shape, dtype and device (gradients flow through).
    T > 1 softens the softmax, T < 1 sharpens it; the argmax of every row is unchanged. `temperature`
    may be a number, a one-element tensor or a TemperatureScaling."""
    t = _temperature(temperature)
    z = logits if isinstance(logits, torch.Tensor) else _tensor(logits, "logits")
    if not z.is_floating_point():
        z = z.to(torch.get_default_dtype())
    return z / t


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (Guo et al. 2017, section 4.2).

    Fit it on held-out data (a validation split), never on the training data, where the network is
    overconfident by construction. The NLL is minimised over log T (so T stays positive) with
    torch.optim.LBFGS and a strong Wolfe line search, from T = 1, in float64 on the logits' device;
    `max_iter` bounds the LBFGS iterations. It works under torch.no_grad() or torch.inference_mode().

    The NLL is convex in 1/T, so the minimum is unique. The result is clamped to
    [MIN_TEMPERATURE, MAX_TEMPERATURE] and is never worse than T = 1: if the fit did not lower the NLL
    (already calibrated logits), 1.0 is returned. When every sample is classified correctly, the NLL
    keeps falling as T -> 0 and has no finite minimum: a UserWarning is issued and the small T where
    the fit stopped is returned; fit on a larger or harder set. Empty input is a ValueError."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    z = _scores(logits, "logits")
    y = _labels(labels, z.shape[0], z.shape[1], z.device)
    with torch.inference_mode(False), torch.enable_grad():
        z, y = z.clone(), y.clone()            # ordinary tensors even if made under inference_mode
        log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z * torch.exp(-log_t), y)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        found = float(log_t.detach())
        bounded = min(max(found, math.log(MIN_TEMPERATURE)), math.log(MAX_TEMPERATURE))
        t = min(max(math.exp(bounded), MIN_TEMPERATURE), MAX_TEMPERATURE) if math.isfinite(found) else 1.0
        before = float(F.cross_entropy(z, y))
        after = float(F.cross_entropy(z / t, y))
        if not math.isfinite(after) or after > before:
            t = 1.0
        top2 = z.topk(2, dim=1).values
        if bool(((z.argmax(1) == y) & (top2[:, 0] > top2[:, 1])).all()):
            warnings.warn(f"fit_temperature: all {z.shape[0]} samples are classified correctly, so the NLL "
                          f"keeps falling as T -> 0 and has no finite minimum; returning T = {t:.4g}. Fit the "
                          "temperature on a larger or harder held-out set.", UserWarning, stacklevel=2)
    return t


@dataclass(frozen=True)
class TemperatureScaling:
    """A fitted temperature: `TemperatureScaling.fit(val_logits, val_labels)`, then `ts(logits)` for the
    scaled logits or `ts.probs(logits)` for calibrated probabilities. `to_dict()` is JSON-serialisable
    (a run stores it as calibration.json) and `from_dict` reads it back."""
    temperature: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "temperature", _temperature(self.temperature))

    @classmethod
    def fit(cls, logits: Any, labels: Any, max_iter: int = 100) -> "TemperatureScaling":
        return cls(fit_temperature(logits, labels, max_iter=max_iter))

    def __call__(self, logits: Any) -> torch.Tensor:
        return apply_temperature(logits, self.temperature)

    def probs(self, logits: Any) -> torch.Tensor:
        return torch.softmax(self(logits), dim=-1)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "temperature_scaling", "temperature": self.temperature}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TemperatureScaling":
        """Read `to_dict()`'s output. Other keys (metrics stored alongside) are ignored; a different
        `method` or a missing or invalid temperature is a ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"calibration data must be a JSON object, got {type(data).__name__}")
        method = data.get("method", "temperature_scaling")
        if method != "temperature_scaling":
            raise ValueError(f"calibration data is for method {method!r}, not 'temperature_scaling'")
        if "temperature" not in data:
            raise ValueError("calibration data has no 'temperature'")
        return cls(_temperature(data["temperature"]))


# --------------------------------------------------------------------------------------------- plot

def _draw_set(ax_rel, ax_hist, bins: CalibrationBins, accuracy: float, mean_conf: float, title: str) -> None:
    edges = bins.edges.numpy()
    width = 1.0 / bins.n_bins
    centers = (edges[:-1] + edges[1:]) / 2
    filled = (bins.counts > 0).numpy()
    acc, conf = bins.accuracy.numpy(), bins.confidence.numpy()
    ax_rel.plot([0, 1], [0, 1], linestyle="--", color="0.35", linewidth=1.2, label="perfect calibration",
                zorder=3)
    ax_rel.bar(centers[filled], acc[filled], width=width, color="tab:blue", edgecolor="black", linewidth=0.6,
               label="accuracy", zorder=1)
    # The gap: from the bin's accuracy to its mean confidence (above the bar: overconfident; below: under).
    ax_rel.bar(centers[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width, color="tab:red",
               alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap to mean confidence",
               zorder=2)
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1)
    ax_rel.set_ylabel("accuracy")
    ax_rel.set_title(title, fontsize=11)
    ax_rel.grid(True, alpha=0.25)
    ax_rel.legend(loc="upper left", fontsize=8)
    ax_rel.tick_params(labelbottom=False)

    frac = bins.counts.double().numpy() / max(bins.n_samples, 1)
    ax_hist.bar(centers, frac, width=width, color="0.6", edgecolor="black", linewidth=0.6)
    ax_hist.axvline(accuracy, color="tab:blue", linestyle="--", linewidth=1.5, label=f"accuracy {accuracy:.3f}")
    ax_hist.axvline(mean_conf, color="tab:red", linestyle=":", linewidth=1.8,
                    label=f"mean confidence {mean_conf:.3f}")
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("confidence (largest probability)")
    ax_hist.set_ylabel("fraction of samples")
    ax_hist.grid(True, alpha=0.25)
    ax_hist.legend(loc="upper left", fontsize=8)


def reliability_diagram(probs: Any, labels: Any, path: str | Path, n_bins: int = 15, title: str | None = None,
                        *, probs_after: Any = None, names: tuple[str, str] = ("before", "after")) -> dict[str, Any]:
    """Write a reliability diagram (Guo et al. 2017, figure 1) to `path` (PNG; another format if the
    suffix names one matplotlib knows, e.g. .pdf or .svg) and return {"path", "ece"} (plus
    "ece_after" with `probs_after`).

    Top: per confidence bin, a bar up to the bin's accuracy, the diagonal of perfect calibration, and
    the gap between accuracy and mean confidence shaded red (above the bar: overconfident; below:
    underconfident). Bottom: the fraction of samples per bin, with the overall accuracy and mean
    confidence as vertical lines. ECE is in the title. With `probs_after` (e.g. the probabilities after
    temperature scaling, same samples and labels) a second column shows them side by side; `names`
    labels the two columns. Drawn with matplotlib's Agg canvas, without pyplot (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_bins = _n_bins(n_bins)
    sets = [("probs", probs)] + ([("probs_after", probs_after)] if probs_after is not None else [])
    stats = []
    for name, value in sets:
        p = _probs(value, name)
        if stats and p.shape != stats[0][0]:
            raise ValueError(f"probs_after has shape {tuple(p.shape)} but probs has {tuple(stats[0][0])}: "
                             "both must be predictions for the same samples")
        y = _labels(labels, p.shape[0], p.shape[1], p.device)
        bins = calibration_bins(value, y, n_bins)          # binned in the precision of the input
        conf, pred = p.max(1)
        stats.append((p.shape, bins, float((pred == y).double().mean()), float(conf.mean())))

    two = len(stats) == 2
    if two and (not isinstance(names, (tuple, list)) or len(names) != 2):
        raise ValueError(f"names must be two column labels, got {names!r}")
    fig = Figure(figsize=(11.0 if two else 5.8, 7.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(stats), height_ratios=[3, 1.1])
    n = stats[0][0][0]
    for j, (_, bins, acc, mean_conf) in enumerate(stats):
        ece = bins.ece()
        if two:
            panel = f"{names[j]}: ECE = {100 * ece:.2f}%"
        else:
            panel = f"{title + chr(10) if title else ''}ECE = {100 * ece:.2f}% ({n} samples, {n_bins} bins)"
        ax_rel = fig.add_subplot(grid[0, j])
        ax_hist = fig.add_subplot(grid[1, j], sharex=ax_rel)
        _draw_set(ax_rel, ax_hist, bins, acc, mean_conf, panel)
    if two:
        fig.suptitle(f"{title or 'reliability diagram'} ({n} samples, {n_bins} bins)", fontsize=12)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    result: dict[str, Any] = {"path": str(out), "ece": stats[0][1].ece()}
    if two:
        result["ece_after"] = stats[1][1].ece()
    return result
