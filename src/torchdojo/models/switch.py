"""Mixture of experts with top-1 ("switch") routing: Fedus, Zoph & Shazeer 2021, "Switch Transformers"
(arXiv 2101.03961), the lecture's mixture model against negative transfer; after the sparsely-gated
mixture of experts of Shazeer et al. 2017 (arXiv 1701.06538).

`SwitchFFN` holds `experts` feed-forward networks and a router. Each row goes to the one expert its
router probability ranks first, and that expert's output is scaled by the probability (so the router
learns through it). In training an expert takes at most capacity = ceil(capacity_factor · rows /
experts) rows per call, in arrival order; the rows beyond it get 0, and the residual connection around
the layer passes them on unchanged, as in the paper. In eval mode the capacity is
`eval_capacity_factor`'s, by default none: every row is processed (the paper also evaluates with a
larger factor than it trains with). The load-balancing loss of the paper,
    aux = experts · Σ_i f_i · P_i
(f_i: the share of rows whose first choice is expert i, P_i: the mean router probability of expert i),
is 1 when routing is uniform and grows as it collapses onto few experts; each call stores it in
`aux_loss` for the `load_balance` method to add to the training loss.

`MoEMLP` is an MLP for tables or anything flattened: an input layer, then `blocks` residual blocks
x + SwitchFFN(LayerNorm(x)), then the output layer."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._types import Dropout, Width


class SwitchFFN(nn.Module):
    """Top-1 routed experts over rows of shape (N, dim); see the module docstring."""
    data_dependent_routing = True       # joint ensembles run such members in a loop instead of vmap

    def __init__(self, dim: int, hidden: int, experts: int = 4, capacity_factor: float = 1.25,
                 eval_capacity_factor: float | None = None):
        super().__init__()
        if experts < 1 or capacity_factor <= 0 or (eval_capacity_factor is not None and eval_capacity_factor <= 0):
            raise ValueError("experts must be >= 1 and the capacity factors > 0")
        self.experts, self.capacity_factor = experts, capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router = nn.Linear(dim, experts, bias=False)
        bound1, bound2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)
        # The experts' weights stacked: (experts, dim, hidden) and (experts, hidden, dim), nn.Linear's init.
        # One parameter per kind for all experts: an idle expert's slice gets a zero gradient, never none,
        # so DistributedDataParallel needs no find_unused_parameters.
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(experts, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.empty(experts, dim).uniform_(-bound2, bound2))
        self.aux_loss: torch.Tensor | None = None       # of the last call
        self.usage: torch.Tensor | None = None          # share of rows routed to each expert, last call

    def capacity(self, rows: int) -> int:
        """Rows one expert takes per call: capacity_factor's in training, eval_capacity_factor's (or all
        rows) in eval mode."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return rows if factor is None else math.ceil(factor * rows / self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        gate, choice = probs.max(dim=-1)
        onehot = F.one_hot(choice, self.experts).to(probs.dtype)
        # f_i and P_i of the load-balancing loss (f from the first choice, before capacity drops rows).
        share = onehot.mean(0)
        self.aux_loss = self.experts * torch.sum(share * probs.mean(0))
        self.usage = share.detach()
        # Each row's place in its expert's queue; rows past the capacity are dropped (output 0).
        position = ((torch.cumsum(onehot, 0) - 1) * onehot).sum(-1)
        kept = position < self.capacity(len(x))
        out = torch.zeros_like(x)
        for e in range(self.experts):
            rows = torch.nonzero((choice == e) & kept).squeeze(1)
            if len(rows) == 0:
                continue
            h = F.relu(x[rows] @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]
            out = out.index_put((rows,), (h * gate[rows, None]).to(out.dtype))     # bf16 autocast: same dtype
        return out


@dataclass
class MoEMLPConfig:
    width: Width = 64
    blocks: Width = 2
    experts: Width = 4
    expert_hidden: Width = 128
    capacity_factor: float = 1.25
    eval_capacity_factor: Optional[float] = None      # None: no row is dropped in eval mode
    dropout: Dropout = 0.0


class MoEMLP(nn.Module):
    Config = MoEMLPConfig

    def __init__(self, input_shape, num_outputs: int, config: MoEMLPConfig = MoEMLPConfig()):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), config.width), nn.ReLU())
        self.norms = nn.ModuleList(nn.LayerNorm(config.width) for _ in range(config.blocks))
        self.moe = nn.ModuleList(SwitchFFN(config.width, config.expert_hidden, config.experts, config.capacity_factor,
                                           config.eval_capacity_factor) for _ in range(config.blocks))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.width, num_outputs)
        self.feature_dim = config.width

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the output layer, (N, width)."""
        h = self.stem(x)
        for norm, moe in zip(self.norms, self.moe):
            h = h + self.dropout(moe(norm(h)))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    @property
    def output_layer(self) -> nn.Linear:
        return self.head
