"""Ensembles whose members differ in more than their initialisation (`ensemble.vary` with a mapping of
recipe keys to one value per member: models, augmentations, ...): each member is a run of its own in
`RUN_DIR/members/m<i>/`, trained one after another; the run directory itself holds the recipe and a
summary with every member's metrics and the ensemble's.

    ensemble: {members: 3, vary: [seed, {phases.0.augment: [[...], [...], [...]]}], combine: mean_prob}
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from torch import nn

from .atomic import atomic_write_text
from .errors import ConfigError, DojoError
from .recipe import Recipe, apply_override, load_recipe
from .run_lock import acquire_run_dir


def is_sequential(recipe: Recipe) -> bool:
    return recipe.ensemble is not None and any(isinstance(v, dict) for v in recipe.ensemble.vary)


def member_recipes(recipe: Recipe) -> list[dict]:
    """One plain recipe per member: the ensemble key removed, `seed` + i when `seed` is varied, each varied
    key set to the member's value, and the data split pinned to the ensemble's seed so that all members
    train, validate and test on the same rows."""
    spec = recipe.ensemble
    base = recipe.model_dump(mode="json")
    del base["ensemble"]
    if base["data"].get("split_seed") is None:
        base["data"]["split_seed"] = recipe.seed
    members = []
    for i in range(spec.members):
        raw = copy.deepcopy(base)
        raw["name"] = f"{recipe.name}-m{i}"
        for varied in spec.vary:
            if varied == "seed":
                raw["seed"] = recipe.seed * 1000 + i
                continue
            for key, values in varied.items():
                apply_override(raw, f"{key}={json.dumps(values[i])}")      # JSON is YAML
        try:
            load_recipe(raw)
        except DojoError as exc:
            raise ConfigError(f"ensemble (member {i})", str(exc)) from None
        members.append(raw)
    return members


def train_ensemble(recipe: Recipe, run_dir: Path, quiet: bool = False) -> dict:
    """Train every member (resuming or skipping those already done), then evaluate members and ensemble
    on val and test; writes `summary.json` in `run_dir` and returns it. Holds `run_dir`'s writer lock
    throughout (see run_lock; each member's Trainer.fit locks its own folder)."""
    with acquire_run_dir(run_dir):
        return _train_ensemble(recipe, Path(run_dir), quiet)


def _train_ensemble(recipe: Recipe, run_dir: Path, quiet: bool) -> dict:
    from .ensembles import train_members
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    t0 = time.perf_counter()
    train_members(member_recipes(recipe), run_dir, quiet=quiet)
    trainer, models = ensemble_models(run_dir, recipe)
    metrics = {}
    for split in ("val", "test"):
        for name, model in models.items():
            metrics.update(trainer.evaluate(split, model, name))
    summary = {"recipe": recipe.name, "status": "finished", "metrics": metrics, "members": recipe.ensemble.members,
               "wall_seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if not quiet:
        trainer.reporter.quiet = False
        trainer.reporter.table(metrics, f"{recipe.name}: ensemble of {recipe.ensemble.members}")
    return summary


def ensemble_models(run_dir: Path, recipe: Recipe, tta_views: int | None = None):
    """(the first member's Trainer, for data and evaluation; named models: "" and "ensemble" = the
    combination, "member<i>" = each member, and with TTA "tta" / "member<i>_tta")."""
    from .ensemble import Ensemble
    from .ensembles import WeightedEnsemble, fit_combination_weights, load_member_models, member_dirs
    from .trainer import Trainer
    dirs = member_dirs(run_dir)
    if len(dirs) != recipe.ensemble.members:
        raise DojoError(f"{run_dir}: {len(dirs)} of {recipe.ensemble.members} members trained; "
                        f"`dojo train` with the same --run-dir finishes them")
    members = load_member_models(run_dir)
    trainer = Trainer.from_run_dir(dirs[0], quiet=True)
    task_type = trainer.state.data.info.task_type
    how = "mean" if task_type != "classification" else ("mean_logprob" if recipe.ensemble.combine == "mean_logprob"
                                                        else "mean_prob")
    if recipe.ensemble.combine == "weights":
        outputs, y = _outputs(trainer, members, "val")
        combined: nn.Module = WeightedEnsemble(members, fit_combination_weights(outputs, y, task_type=task_type),
                                               "mean_prob" if task_type == "classification" else "mean")
    else:
        combined = Ensemble(members, how)
    models = {"": combined.eval(), "ensemble": combined, **{f"member{i}": m for i, m in enumerate(members)}}
    tta = trainer.tta_wrapper(tta_views)
    if tta is not None:
        models.update({f"{name}_tta" if name else "tta": tta(m) for name, m in list(models.items())
                       if name != "ensemble"})
    return trainer, models


def _outputs(trainer, members: list[nn.Module], split: str):
    import torch
    with torch.no_grad():
        outs, ys = [], []
        for batch in trainer.eval_loader(split):
            outs.append(torch.stack([m(batch["x"]) for m in members]))
            ys.append(batch["y"])
    return torch.cat(outs, dim=1), torch.cat(ys)
