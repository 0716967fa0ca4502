"""Parameter groups for pretrained vs new layers, layer-wise LR decay and no weight decay on biases
and norm weights.

Layer-wise LR decay follows Clark et al. 2020 (ELECTRA, arXiv 2003.10555) and Bao et al. 2021 (BEiT,
arXiv 2106.08254). Excluding biases and norm weights from weight decay and from LARS/LAMB trust ratios
is later large-batch practice, not the LARS paper (You et al. 2017, arXiv 1708.03888, adapt every layer):
He et al. 2018 (arXiv 1812.01187, "no bias decay", after Jia et al. 2018, arXiv 1807.11205) leave biases
and BatchNorm's scale and shift undecayed, and the LAMB and LARS code of google-research/albert and
google-research/simclr skips the same tensors in the trust ratio.

    groups = param_groups(model, [{"match": "features.*", "lr_mult": 0.1}], lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(groups)

Every parameter lands in exactly one group. Rules are tried in order; the first whose pattern matches
a parameter's name (`features.*`, or a module name such as `features`) sets its `lr_mult` and,
optionally, its weight decay. Unmatched parameters keep lr_mult 1."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping

from torch import nn

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


@dataclass(frozen=True)
class GroupRule:
    match: str
    lr_mult: float = 1.0
    weight_decay: float | None = None


def matches(name: str, pattern: str) -> bool:
    """A parameter name matches a glob pattern itself or as the name of a module that holds it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases (any parameter named `bias*`, e.g. a GRU's `bias_ih_l0`) and the weights of normalisation layers."""
    names = set()
    for module_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{p_name}" if module_name else p_name
            if p_name.startswith("bias") or isinstance(module, NORM_LAYERS):
                names.add(full)
    return names


def block_index(name: str, blocks: list[str]) -> int | None:
    for i, block in enumerate(blocks):
        if name == block or name.startswith(block + "."):
            return i
    return None


def param_groups(model: nn.Module, rules: Iterable[GroupRule | Mapping] = (), *, no_decay: bool = True,
                 layer_decay: float | None = None, lr: float | None = None, weight_decay: float | None = None,
                 frozen: Mapping[str, set[str]] | None = None) -> list[dict]:
    """Split `model`'s parameters into optimizer groups.

    - `rules`: GroupRule or mappings `{match, lr_mult, weight_decay}`; a rule matching nothing is an error.
    - `no_decay`: biases and norm weights get weight_decay 0 and `trust_ratio: False` (LARS/LAMB).
    - `layer_decay`: block i of n (input to output, from the model's `block_names()`) gets
      lr_mult * layer_decay**(n-1-i); parameters outside the blocks keep their multiplier.
    - `lr`, `weight_decay`: base values written into each group; leave them out to let the optimizer's
      defaults apply (then scale each group's lr by its `lr_mult`, as the trainer does).
    - `frozen`: {phase name: parameter names frozen in that phase}; groups are split so each is wholly
      frozen or not in every phase, and the trainer sets a frozen group's lr to 0.
    Each group carries `name` and `lr_mult` keys for display and logging."""
    rules = [r if isinstance(r, GroupRule) else GroupRule(**r) for r in rules]
    named = [(n, p) for n, p in model.named_parameters()]
    decay_free = no_decay_names(model) if no_decay else set()
    blocks: list[str] = []
    if layer_decay is not None:
        if not hasattr(model, "block_names"):
            raise ValueError(f"layer_decay needs a model that declares its block order (block_names()); "
                             f"{type(model).__name__} does not")
        blocks = list(model.block_names())
    frozen = frozen or {}
    used = [False] * len(rules)
    groups: dict[tuple, dict] = {}
    for name, p in named:
        rule_i = next((i for i, r in enumerate(rules) if matches(name, r.match)), None)
        rule = rules[rule_i] if rule_i is not None else GroupRule("*")
        if rule_i is not None:
            used[rule_i] = True
        block = block_index(name, blocks) if blocks else None
        is_no_decay = name in decay_free
        frozen_in = tuple(phase for phase, names in frozen.items() if name in names)
        key = (rule_i, is_no_decay, block, frozen_in)
        if key not in groups:
            mult = rule.lr_mult * (layer_decay ** (len(blocks) - 1 - block) if block is not None else 1.0)
            group: dict = {"params": [], "name": _label(rule_i, rule, is_no_decay, block, blocks, frozen_in),
                           "lr_mult": mult}
            wd = 0.0 if is_no_decay else (rule.weight_decay if rule.weight_decay is not None else weight_decay)
            if wd is not None:
                group["weight_decay"] = wd
            if is_no_decay:
                group["trust_ratio"] = False
            if lr is not None:
                group["lr"] = lr * mult
            groups[key] = group
        groups[key]["params"].append(p)
    for i, was_used in enumerate(used):
        if not was_used:
            raise ValueError(f"param_groups rule {i} ('{rules[i].match}') matches no parameter; parameter names "
                             f"look like: {', '.join(n for n, _ in named[:4])}")
    return list(groups.values())


def _label(rule_i, rule, is_no_decay, block, blocks, frozen_in) -> str:
    parts = [rule.match if rule_i is not None else "default"]
    if block is not None:
        parts.append(blocks[block])
    if is_no_decay:
        parts.append("no_decay")
    if frozen_in:
        parts.append("frozen@" + ",".join(frozen_in))
    return "/".join(parts)


def apply_lr_mult(optimizer) -> None:
    """Scale each group's lr by its `lr_mult` once, right after building the optimizer from groups that
    did not set `lr` themselves."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
