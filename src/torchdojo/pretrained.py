"""Start a model from pretrained weights: the hand-over between the lecture's two pretraining stages,
pretraining (here: supervised, on a big typical dataset) and encoding refinement (fine-tuning on the
task at hand, typically with the pretrained layers frozen first, then at a lower LR than the new ones).

Yosinski et al. 2014 (arXiv 1411.1792) measured how well features transfer between tasks; Howard &
Ruder 2018 (ULMFiT, arXiv 1801.06146) fine-tune with discriminative LRs and gradual unfreezing, which
torchdojo expresses with phases, `freeze` and `param_groups` (see docs/pretraining.md).

`load_pretrained(model, source)` copies every tensor (parameters and buffers, so BatchNorm statistics
too) whose name and shape match a finished run's final weights or a safetensors file, except the
model's output layer (a new task has new outputs) unless asked for. What was loaded, skipped or
missing is returned as an `InitReport`; nothing is loaded with pickle."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .checkpoint import read_final_weights, read_weights_file
from .errors import DojoError

FINAL_WEIGHTS = Path("checkpoints") / "final" / "model.safetensors"


@dataclass
class InitReport:
    """What `load_pretrained` did, by tensor name (the model's names)."""
    source: str
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)     # "name: model (a, b) vs source (c, d)"
    not_in_source: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)           # by include/exclude or the output layer
    unused: list[str] = field(default_factory=list)             # source tensors no model tensor took

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for what, names in (("left out", self.left_out), ("kept new (not in the source)", self.not_in_source),
                            ("kept new (other shape)", self.shape_mismatch)):
            if names:
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                parts.append(f"{what}: {shown}")
        return "; ".join(parts)


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a run directory's final model (`checkpoints/final/model.safetensors`) or of a
    `.safetensors` file."""
    path = Path(source)
    if path.is_dir():
        if not (path / FINAL_WEIGHTS).is_file():
            hint = " (it is not a run directory)" if not (path / "recipe.yaml").is_file() else \
                f"; finish it first (`dojo resume {path}`)"
            raise DojoError(f"{path} has no final model ({FINAL_WEIGHTS}){hint}")
        return read_final_weights(path)     # checked against its manifest
    if not path.is_file():
        raise DojoError(f"{path} does not exist")
    if path.suffix != ".safetensors":
        raise DojoError(f"{path}: pretrained weights must be a run directory or a .safetensors file "
                        f"(other formats would need pickle)")
    return read_weights_file(path, "pretrained weights")


def _output_names(model: nn.Module) -> set[str]:
    """Names (in `model.state_dict()`) of the output layer's tensors, for models that expose one."""
    tree = getattr(model, "members", model)       # a StackedEnsemble: the members' own module tree
    layer = getattr(tree, "output_layer", None)
    if not isinstance(layer, nn.Module):
        return set()
    mine = {id(t) for t in [*layer.parameters(), *layer.buffers()]}
    prefix = "members." if tree is not model else ""
    return {prefix + n for n, t in [*tree.named_parameters(), *tree.named_buffers()] if id(t) in mine}


def load_pretrained(model: nn.Module, source: str | Path, include: Sequence[str] = ("*",),
                    exclude: Sequence[str] = (), output_layer: bool = False, prefix: str = "") -> InitReport:
    """Copy matching pretrained tensors into `model` in place (its parameters keep their identity, so
    an optimizer built before still holds them).

    `include`/`exclude` are glob patterns over the model's tensor names (`features.*`); the output layer
    is left out unless `output_layer` is true. The model's tensor X takes the source's `prefix` + X
    (`prefix="encoder."`: the encoder of an `autoencoder` run). A joint ensemble (`StackedEnsemble`,
    names `members.X`) takes the source's X in every member. Raises DojoError when nothing matches."""
    weights = read_weights(source)
    report = InitReport(str(source))
    outputs = set() if output_layer else _output_names(model)
    stacked = hasattr(model, "members") and hasattr(model, "num_members")
    taken = set()
    with torch.no_grad():
        for name, target in model.state_dict().items():
            key = name[len("members."):] if stacked and name.startswith("members.") else name
            if (not any(fnmatch.fnmatchcase(key, p) for p in include) or any(fnmatch.fnmatchcase(key, p) for p in exclude)
                    or name in outputs):
                report.left_out.append(name)
                continue
            if prefix + key not in weights:
                report.not_in_source.append(name)
                continue
            value = weights[prefix + key]
            shape = target.shape[1:] if stacked and key != name else target.shape
            if tuple(value.shape) != tuple(shape):
                report.shape_mismatch.append(f"{name}: model {tuple(shape)} vs source {tuple(value.shape)}")
                continue
            target.copy_(value.to(dtype=target.dtype, device=target.device))   # broadcasts over members
            report.loaded.append(name)
            taken.add(prefix + key)
    report.unused = [k for k in weights if k not in taken]
    if not report.loaded:
        sample = ", ".join(list(weights)[:3])
        mine = ", ".join(list(model.state_dict())[:3])
        raise DojoError(f"no pretrained tensor fits the model: {source} has {sample}, ...; the model has {mine}, "
                        f"...; {report.summary()}")
    return report
