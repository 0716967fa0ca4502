"""Lookahead: k steps forward, 1 step back (Zhang et al. 2019, arXiv 1907.08610).

Wraps any optimizer. Slow weights start as a copy of the parameters; after every k-th step of the
inner optimizer, slow = slow + alpha*(fast - slow) and the parameters (fast weights) are set to slow.
`param_groups` is the inner optimizer's own list, so LR schedulers and the trainer's schedules act on
the inner optimizer; `state_dict` holds the inner state, the slow weights and the step counter."""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class Lookahead(Optimizer):
    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5, *, foreach: bool | None = None):
        if k < 1:
            raise ValueError("k must be at least 1")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        self.optimizer, self.k, self.alpha, self.foreach = optimizer, k, alpha, foreach
        # Optimizer.__init__ sets up torch's hook machinery; the group dicts it registers are the inner
        # optimizer's own, and the list itself is shared below (add_param_group adds to both).
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.lookahead_steps = 0
        self._params = [p for group in self.param_groups for p in group["params"]]
        self.slow = [p.detach().clone() for p in self._params]
        self._ready = True

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_ready", False):
            # Optimizer.__init__ registering the inner optimizer's existing groups.
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        new = self.optimizer.param_groups[-1]["params"]
        self._params.extend(new)
        self.slow.extend(p.detach().clone() for p in new)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, inner={self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.lookahead_steps += 1
        if self.lookahead_steps % self.k == 0:
            self._sync_slow_weights()
        return loss

    def _sync_slow_weights(self) -> None:
        # Frozen parameters (requires_grad False) are left alone: freezing promises they do not move.
        pairs = [(s, p) for s, p in zip(self.slow, self._params) if p.requires_grad]
        if not pairs:
            return
        slow, fast = [s for s, _ in pairs], [p for _, p in pairs]
        if self.foreach is not False and len({(p.device, p.dtype) for p in fast}) == 1:
            torch._foreach_lerp_(slow, fast, self.alpha)
            torch._foreach_copy_(fast, slow)
        else:
            for s, p in zip(slow, fast):
                s.add_(p - s, alpha=self.alpha)
                p.copy_(s)

    @property
    def state(self):
        """The inner optimizer's per-parameter state (momentum buffers, moments, ...)."""
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        pass   # Optimizer.__init__ assigns an empty state; ours is the inner optimizer's.

    def state_dict(self) -> dict:
        return {"inner": self.optimizer.state_dict(), "slow": [s.clone() for s in self.slow],
                "lookahead_steps": self.lookahead_steps, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["slow"]) != len(self.slow):
            raise ValueError(f"Lookahead state has {len(state_dict['slow'])} slow tensors, this optimizer "
                             f"has {len(self.slow)} parameters")
        self.optimizer.load_state_dict(state_dict["inner"])
        # torch's load_state_dict gives the inner optimizer new group dicts: share them again.
        self.param_groups = self.optimizer.param_groups
        with torch.no_grad():
            for slow, saved in zip(self.slow, state_dict["slow"]):
                slow.copy_(saved)
        self.lookahead_steps = state_dict["lookahead_steps"]
        self.k, self.alpha = state_dict["k"], state_dict["alpha"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
