"""Ensembles of independently initialised members: trained together in one vectorised pass
(`StackedEnsemble`), or one after another when they differ (`train_members`), with diversity
penalties (negative correlation learning, weight distance) and combination weights fitted on
validation data. See docs/ensembles.md.

    ensemble = StackedEnsemble([build() for _ in range(5)])           # same architecture, M = 5
    loss, parts = ensemble_training_loss(ensemble, batch, terms, ncl=0.5)
    loss.backward(); optimizer.step()                                  # any element-wise optimizer
    log_probs = ensemble(x)                                            # combine() of the members

`ensemble.py` (snapshot ensembles, `combine`, `Ensemble`) holds the combination rules used here."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from .ensemble import How, combine
from .errors import DojoError
from .runfiles import read_json_object
from .tasks.base import LossTerm, weighted_loss

__all__ = ["StackedEnsemble", "WeightedEnsemble", "ncl_penalty", "weight_distance_penalty",
           "ensemble_training_loss", "pairwise_disagreement", "member_accuracies", "fit_combination_weights",
           "combine_weighted", "train_members", "load_member_models", "member_dirs", "check_same_data"]


# -- members trained together ------------------------------------------------------------------------


def _needs_loop(model: nn.Module) -> str | None:
    """Why `model` cannot run under torch.vmap with exact semantics, or None if it can."""
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase):
            return f"'{name}' is a {type(m).__name__} (aten::{type(m).__name__.lower()} has no vmap batching rule)"
        if getattr(m, "data_dependent_routing", False):
            return f"'{name}' routes rows to experts (a data-dependent shape, which vmap cannot batch)"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None:
            return (f"'{name}' is a BatchNorm with momentum=None (its cumulative average reads "
                    f"num_batches_tracked as a Python number)")
    return None


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), leaf


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    module, leaf = _owner(root, name)
    if is_param:
        setattr(module, leaf, value)                 # register_parameter; nn.RNNBase refreshes _flat_weights
    else:
        module._buffers[leaf] = value                # keeps the buffer's persistent/non-persistent status


class StackedEnsemble(nn.Module):
    """M members of one architecture whose parameters and buffers are stacked along a new first
    dimension and evaluated in one `torch.vmap` over that dimension (`torch.func.functional_call`).

    The stacked tensors are this module's own parameters and buffers, held in `self.members`: a copy
    of member 0's module tree in which every parameter and buffer has a leading member dimension. So
    `named_parameters()` reads `members.<the member's own name>` (e.g. `members.head.weight` of shape
    (M, K, H)), `state_dict()` saves the stacked tensors (safetensors included), any torch optimizer
    updates them, parameter-group rules, `no_decay` and freeze patterns see the original module types
    and names, and `train()`/`eval()` switch dropout and BatchNorm of all members at once.

    BatchNorm: the running statistics are stacked buffers passed to vmap with the parameters, so each
    member's BatchNorm updates its own slice in place, in train mode, exactly as the member alone
    would (vmap's restriction is only on updating an *unbatched* buffer from batched data, the case of
    one model over a batch of inputs). Members vmap cannot run exactly (a GRU: no batching rule; a
    BatchNorm with momentum=None, as `torch.optim.swa_utils.update_bn` sets for a while) run in a Python
    loop over slices of the same stacked tensors instead: the same results, without the speed-up.
    `vectorize=False` forces the loop.

    Dropout draws different masks for different members (`randomness="different"`)."""

    def __init__(self, members: list[nn.Module], how: How = "mean_prob", vectorize: bool | None = None):
        super().__init__()
        if not members:
            raise ValueError("a StackedEnsemble needs at least one member")
        first = members[0]
        p_names = [n for n, _ in first.named_parameters()]
        b_names = [n for n, _ in first.named_buffers()]
        for i, m in enumerate(members[1:], 1):
            if type(m) is not type(first):
                raise ValueError(f"member {i} is a {type(m).__name__}, member 0 a {type(first).__name__}: "
                                 f"stacked members share one architecture (use train_members otherwise)")
            for what, mine, theirs in (("parameters", dict(first.named_parameters()), dict(m.named_parameters())),
                                       ("buffers", dict(first.named_buffers()), dict(m.named_buffers()))):
                if list(mine) != list(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
                    raise ValueError(f"member {i} has other {what} (names or shapes) than member 0")
        if len({id(p) for m in members for p in m.parameters()}) != len(members) * len(p_names):
            raise ValueError("members share parameter tensors; give each member its own module")
        template = copy.deepcopy(first)
        with torch.no_grad():
            for name in p_names:
                stacked = torch.stack([m.get_parameter(name).detach() for m in members])
                _set_tensor(template, name, nn.Parameter(stacked, first.get_parameter(name).requires_grad), True)
            for name in b_names:
                stacked = torch.stack([m.get_buffer(name).detach() for m in members])
                _set_tensor(template, name, stacked, False)
        self.members = template
        self.how = how
        self._num_members = len(members)
        reason = _needs_loop(first)
        if vectorize and reason is not None:
            raise ValueError(f"vectorize=True, but {reason}")
        self.vectorize = (reason is None) if vectorize is None else vectorize
        self.loop_reason = reason if not self.vectorize else None

    @classmethod
    def from_seeds(cls, build: Callable[[], nn.Module], seeds: Sequence[int], how: How = "mean_prob",
                   vectorize: bool | None = None) -> "StackedEnsemble":
        """Members `build()` under `torch.manual_seed(seed)` for each seed (different initialisations),
        leaving the global CPU random state as it was."""
        members = []
        with torch.random.fork_rng(devices=[]):
            for seed in seeds:
                torch.manual_seed(seed)
                members.append(build())
        return cls(members, how=how, vectorize=vectorize)

    @property
    def num_members(self) -> int:
        return self._num_members

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output on the same input: (M, N, ...)."""
        params = dict(self.members.named_parameters())
        buffers = dict(self.members.named_buffers())
        # Checked on every call: torch.optim.swa_utils.update_bn sets BatchNorm momentum to None for a while.
        if self.vectorize and _needs_loop(self.members) is None:
            def one(p, b, inp):
                return functional_call(self.members, (p, b), (inp,))
            return vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
        outs = []
        for i in range(self._num_members):
            # Indexing gives views: gradients reach the stacked parameters, BatchNorm updates the slice.
            outs.append(functional_call(self.members, ({k: v[i] for k, v in params.items()},
                                                       {k: v[i] for k, v in buffers.items()}), (x,)))
        return torch.stack(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`ensemble.combine` of the members' outputs (log-probabilities for classification)."""
        return combine(list(self.member_outputs(x).unbind(0)), self.how)

    @torch.no_grad()
    def member(self, i: int) -> nn.Module:
        """A standalone copy of member i: its current weights and buffers, every submodule in the same
        train/eval mode as here."""
        if not -self._num_members <= i < self._num_members:
            raise IndexError(f"member {i} of {self._num_members}")
        model = copy.deepcopy(self.members)
        for name, p in self.members.named_parameters():
            _set_tensor(model, name, nn.Parameter(p[i].clone(), p.requires_grad), True)
        for name, b in self.members.named_buffers():
            _set_tensor(model, name, b[i].clone(), False)
        return model                     # deepcopy kept each submodule's mode (e.g. a frozen part in eval)

    def member_list(self) -> list[nn.Module]:
        """`member(i)` for every member."""
        return [self.member(i) for i in range(self._num_members)]

    def block_names(self) -> list[str]:
        """The members' blocks (for layer-wise LR decay), under `members.`."""
        if not hasattr(self.members, "block_names"):
            raise AttributeError(f"{type(self.members).__name__} declares no block_names()")
        return [f"members.{b}" for b in self.members.block_names()]

    def extra_repr(self) -> str:
        mode = "vmap" if self.vectorize else f"loop: {self.loop_reason or 'vectorize=False'}"
        return f"num_members={self._num_members}, how={self.how!r}, {mode}"


# -- diversity penalties -----------------------------------------------------------------------------


def ncl_penalty(probs: torch.Tensor, gradient: str = "liu_yao") -> torch.Tensor:
    """Negative correlation learning penalty (Liu & Yao 1999) of the members' outputs `probs`:
    (M, N, K) softmax probabilities, or (M, N) / (M, N, 1) regression outputs.

        p_i = (f_i - f̄) · Σ_{j≠i} (f_j - f̄) = -(f_i - f̄)²,   f̄ = mean over members

    Returned: Σ_i p_i summed over members and trailing dims (classes) and averaged over the N rows,
    i.e. -(1/N) Σ_n Σ_i Σ_k (f_ink - f̄_nk)²  (≤ 0; more negative = members disagree more).

    Gradient, with respect to member i's output f_i:
      - "liu_yao" (default): as in the paper, f̄ and the other members are constants when member i
        is trained: ∂/∂f_i = Σ_{j≠i}(f_j - f̄)/N = -(f_i - f̄)/N;
      - "autograd": differentiate the value through f̄ too: ∂/∂f_i = -2 (f_i - f̄)/N, twice as large
        (the cross terms through f̄ vanish since Σ_j (f_j - f̄) = 0), so λ_autograd = λ_liu_yao / 2
        trains identically.
    The value is the same for both."""
    if probs.dim() < 2:
        raise ValueError(f"ncl_penalty expects (members, rows, ...), got shape {tuple(probs.shape)}")
    dev = probs - probs.mean(0, keepdim=True)
    n = probs.shape[1]
    if gradient == "autograd":
        return -(dev ** 2).sum() / n
    if gradient == "liu_yao":
        # (f_i - f̄) · stop_grad(Σ_{j≠i}(f_j - f̄)): the paper's p_i, differentiated in f_i alone.
        others = -dev.detach()
        return ((probs - probs.detach().mean(0, keepdim=True)) * others).sum() / n
    raise ValueError(f"unknown gradient '{gradient}'; choose liu_yao or autograd")


def weight_distance_penalty(ensemble: StackedEnsemble) -> torch.Tensor:
    """Minus the mean over member pairs of the squared L2 distance between the members' parameter
    vectors, divided by the number of parameters P of one member:

        -(1 / P) · mean_{i<j} ||θ_i - θ_j||²  =  -(2 / ((M - 1) P)) Σ_i ||θ_i - θ̄||²

    (computed in the second form, tensor by tensor). 0 for one member. Its gradient pushes every member
    away from the members' mean: ∂/∂θ_i = -4 (θ_i - θ̄) / ((M - 1) P). Only trainable parameters count
    (buffers and parameters with requires_grad=False do not). Unbounded below: keep its weight small
    next to weight decay (see docs/ensembles.md)."""
    m = ensemble.num_members
    params = [p for p in ensemble.members.parameters() if p.requires_grad]
    if m < 2 or not params:
        ref = next(ensemble.parameters(), None)
        return torch.zeros((), device=ref.device if ref is not None else None)
    count = sum(p[0].numel() for p in params)
    total = sum(((p - p.mean(0, keepdim=True)) ** 2).sum() for p in params)
    return -2.0 * total / ((m - 1) * count)


def ensemble_training_loss(ensemble: StackedEnsemble, batch: dict, terms: list[LossTerm], ncl: float = 0.0,
                           weight_distance: float = 0.0, task_type: str = "classification",
                           ncl_gradient: str = "liu_yao") -> tuple[torch.Tensor, dict]:
    """The training loss of a StackedEnsemble on one batch (members' outputs computed once, vmapped):

        loss = Σ_m weighted_loss(out_m, y, terms) + ncl · ncl_penalty(f) + weight_distance · penalty

    with f = softmax(out) for classification, the raw outputs for regression. The members' losses are
    SUMMED, so each member's gradient is exactly that of its own loss, as if trained alone (so
    `train/loss` is M times a single member's loss). Returns (loss, parts): parts holds each loss
    term's weighted value averaged over the members (names as in `weighted_loss`), and `ncl` /
    `weight_distance` (their weighted values) when their weight is non-zero; all detached."""
    if task_type not in ("classification", "regression"):
        raise ValueError(f"unknown task_type '{task_type}'; choose classification or regression")
    out = ensemble.member_outputs(batch["x"])
    y = batch["y"]
    total, parts = None, {}
    for m in range(out.shape[0]):
        loss_m, parts_m = weighted_loss(out[m], y, terms)
        total = loss_m if total is None else total + loss_m
        for name, value in parts_m.items():
            parts[name] = parts.get(name, 0.0) + value / out.shape[0]
    if ncl:
        f = torch.softmax(out.float(), dim=-1) if task_type == "classification" else out
        penalty = ncl * ncl_penalty(f, ncl_gradient)
        total = total + penalty
        parts["ncl"] = penalty.detach()
    if weight_distance:
        penalty = weight_distance * weight_distance_penalty(ensemble)
        total = total + penalty
        parts["weight_distance"] = penalty.detach()
    return total, parts


# -- diagnostics and combination ----------------------------------------------------------------------


def _stacked(outputs) -> torch.Tensor:
    return outputs if isinstance(outputs, torch.Tensor) else torch.stack(list(outputs))


def pairwise_disagreement(outputs: torch.Tensor) -> float:
    """Mean over member pairs (i < j) of the share of rows where their argmax differs; outputs (M, N, K)
    logits or probabilities. 0 for one member."""
    pred = _stacked(outputs).argmax(-1)
    m = pred.shape[0]
    if m < 2:
        return 0.0
    pairs = [(pred[i] != pred[j]).double().mean() for i in range(m) for j in range(i + 1, m)]
    return torch.stack(pairs).mean().item()


def member_accuracies(outputs: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each member's accuracy: outputs (M, N, K), y (N,) class indices."""
    pred = _stacked(outputs).argmax(-1)
    return (pred == y.unsqueeze(0)).double().mean(1).tolist()


def combine_weighted(outputs, weights: torch.Tensor, how: str = "mean_prob") -> torch.Tensor:
    """Weighted combination of member outputs (M, N, ...) (a tensor or a list of tensors):
    mean_prob: log Σ_m w_m softmax(out_m), log-probabilities (classification); mean: Σ_m w_m out_m
    (regression). With equal weights this is `ensemble.combine(outputs, how)`."""
    out = _stacked(outputs).float()
    w = weights.to(out.device, torch.float32).reshape(-1, *([1] * (out.dim() - 1)))
    if w.shape[0] != out.shape[0]:
        raise ValueError(f"{w.shape[0]} weights for {out.shape[0]} members")
    if how == "mean":
        return (w * out).sum(0)
    if how == "mean_prob":
        return torch.logsumexp(torch.log(w) + torch.log_softmax(out, dim=-1), dim=0)
    raise ValueError(f"unknown combination '{how}'; choose mean_prob or mean")


def fit_combination_weights(member_logits: torch.Tensor, y: torch.Tensor, steps: int = 200,
                            task_type: str = "classification") -> torch.Tensor:
    """Non-negative member weights summing to 1, fitted on validation outputs (M, N, K) and labels (N,):
    w = softmax(a), a minimising the NLL of the weighted mean of the members' probabilities,
    -mean_n log Σ_m w_m softmax(logits_mn)[y_n] (regression: the MSE of Σ_m w_m out_m against y).
    Starts from uniform weights; full-batch L-BFGS with a strong-Wolfe line search in float64 (no
    randomness: the same data give the same weights). Returns the uniform weights if the fit did not
    improve on them. The objective is convex in w (not in a), so equally good members may share weight
    in any proportion."""
    out = _stacked(member_logits).detach().double()
    m = out.shape[0]
    if task_type == "classification":
        logp = torch.log_softmax(out, dim=-1).gather(-1, y.reshape(1, -1, 1).expand(m, -1, 1).long()).squeeze(-1)

        def objective(a):
            return -torch.logsumexp(torch.log_softmax(a, 0)[:, None] + logp, dim=0).mean()
    elif task_type == "regression":
        target = y.detach().double().reshape(out.shape[1:])

        def objective(a):
            w = torch.softmax(a, 0).reshape(-1, *([1] * (out.dim() - 1)))
            return ((w * out).sum(0) - target).pow(2).mean()
    else:
        raise ValueError(f"unknown task_type '{task_type}'; choose classification or regression")
    uniform = torch.zeros(m, dtype=torch.float64, device=out.device)
    if m == 1:
        return torch.ones(1, device=out.device)
    a = uniform.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([a], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(a)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        fitted = a.detach()
        if not torch.isfinite(objective(fitted)) or objective(fitted) > objective(uniform):
            fitted = uniform
        return torch.softmax(fitted, 0).float()


class WeightedEnsemble(nn.Module):
    """Models evaluated together; forward returns `combine_weighted` of their outputs (the weights from
    `fit_combination_weights`, kept as a buffer so they are saved with the state_dict)."""

    def __init__(self, models: list[nn.Module], weights: torch.Tensor, how: str = "mean_prob"):
        super().__init__()
        if len(models) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(models)} models")
        self.members = nn.ModuleList(models)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32).clone())
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_weighted([m(x) for m in self.members], self.weights, self.how)


# -- members trained one after another ------------------------------------------------------------------


def _summary(member_dir: Path) -> dict | None:
    """A member's summary.json, None if it is missing or unreadable (the member is then trained again)."""
    try:
        return read_json_object(member_dir / "summary.json")
    except DojoError:
        return None


# `data` keys members may set differently: how training rows are drawn, not which rows or values.
_DATA_KEYS_FREE = ("sampler", "num_workers")


def _data_identity(recipe) -> dict:
    """What decides a member's data and splits: its `data` section with the split seed resolved (the
    recipe's seed unless `data.split_seed` is set), less the keys members may vary."""
    data = recipe.data.model_dump()
    data["split_seed"] = recipe.seed if data.get("split_seed") is None else data["split_seed"]
    return {k: v for k, v in data.items() if k not in _DATA_KEYS_FREE}


def check_same_data(recipes: list) -> None:
    """DojoError unless all member recipes (Recipe objects) see the same data and the same train/val/test
    split. The recipe's seed also seeds the split unless `data.split_seed` is set, so members that vary
    `seed` must pin `data.split_seed`: otherwise one member's test rows are another's training rows."""
    first = _data_identity(recipes[0])
    for i, recipe in enumerate(recipes[1:], 1):
        other = _data_identity(recipe)
        if other != first:
            keys = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            hint = (" (the split follows each member's seed: set data.split_seed to one value for all members)"
                    if "split_seed" in keys else "")
            raise DojoError(f"ensemble member {i} sees other data than member 0: data.{', data.'.join(keys)} "
                            f"differ{hint}; members must share the data and its train/val/test split")


def train_members(recipe_dicts: list[dict], run_dir: Path, quiet: bool = True) -> list[dict]:
    """Train each member recipe in `run_dir/members/m<i>`, one after another, and return their summaries.

    All members must see the same data and split (`check_same_data`; members that vary `seed` need
    `data.split_seed`). A member whose folder holds a finished run is skipped (its summary is read
    back); one that was interrupted or failed is resumed from its latest valid checkpoint
    (`Trainer.from_run_dir`), or restarted if it has none. A member folder whose recipe.yaml differs
    from the recipe asked for is a DojoError: remove the folder to retrain that member."""
    from .recipe import load_recipe
    from .trainer import Trainer

    run_dir = Path(run_dir)
    recipes = [load_recipe(copy.deepcopy(spec)) for spec in recipe_dicts]
    if not recipes:
        raise DojoError("an ensemble needs at least one member recipe")
    check_same_data(recipes)
    summaries = []
    for i, recipe in enumerate(recipes):
        member_dir = run_dir / "members" / f"m{i}"
        saved = member_dir / "recipe.yaml"
        if saved.is_file():
            if saved.read_text(encoding="utf-8") != recipe.to_yaml():
                raise DojoError(f"{saved} is not member {i}'s recipe (the ensemble's recipe changed since it was "
                                f"trained); remove {member_dir} to retrain that member")
            summary = _summary(member_dir)
            if summary is not None and summary.get("status") == "finished":
                summaries.append(summary)
                continue
            trainer = Trainer.from_run_dir(member_dir, quiet=quiet)
        else:
            trainer = Trainer(recipe, member_dir, quiet=quiet)
        summaries.append(trainer.fit())
    return summaries


def member_dirs(run_dir: Path) -> list[Path]:
    """`run_dir/members/m0`, `m1`, ... in member order."""
    root = Path(run_dir) / "members"
    found = [p for p in root.glob("m*") if p.is_dir() and p.name[1:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[1:]))


def load_member_models(run_dir: Path, require_finished: bool = True) -> list[nn.Module]:
    """Each member's final model (uncalibrated, in eval mode), in member order. With `require_finished`
    (default) a member that has not finished training is a DojoError."""
    from .trainer import Trainer

    dirs = member_dirs(run_dir)
    if not dirs:
        raise DojoError(f"{run_dir} has no trained members (no members/m<i> folders)")
    models = []
    for d in dirs:
        if require_finished and (_summary(d) or {}).get("status") != "finished":
            raise DojoError(f"ensemble member {d} has not finished training; run training again to finish it")
        models.append(Trainer.from_run_dir(d, quiet=True).trained_models(calibrated=False)[""].eval())
    return models

