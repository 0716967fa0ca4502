"""Issue 14, the hot path: the trainer's own code reads nothing back from the device between log steps
in the default configuration (`nonfinite: raise`), so on a GPU the host keeps queueing work ahead.
Before, `nonfinite: raise` read `loss.item()` every step.

Reads are counted by patching the tensor methods that copy a value to the host (`item`, `tolist`,
`__bool__`, `__float__`, `__int__`, `cpu`, `numpy`) and attributing each call to the file that made it:
only calls made from torchdojo's own code count. torch's optimizers keep their step counters on the host
on purpose (they are CPU tensors on a GPU too), so their reads are not device syncs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torchdojo
from torchdojo import Trainer, load_recipe
from torchdojo.trainer import NonFiniteError

PACKAGE = str(Path(torchdojo.__file__).parent)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@pytest.fixture
def reads(monkeypatch):
    """A list that gets (method, caller file, caller line) for every host read made by torchdojo code."""
    seen: list[tuple[str, str, int]] = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                seen.append((_name, caller.f_code.co_filename, caller.f_lineno))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


def _quickstart(steps: int, every: int) -> dict:
    r = load_recipe("quickstart").model_dump(mode="json")
    r["phases"] = r["phases"][:1]
    r["phases"][0].update(epochs=None, steps=steps)
    r["log"]["every_steps"] = every
    return r


def test_no_host_read_between_log_steps_in_the_default_configuration(reads, monkeypatch):
    """The quickstart's first phase (grad_clip and EMA on, `nonfinite: raise` by default): every read
    inside a training step happens on a log step, and there it is one read."""
    per_step: dict[int, int] = {}
    real_step = Trainer._train_step

    def step(self, batch):
        before = len(reads)
        out = real_step(self, batch)
        per_step[self.state.step] = len(reads) - before
        return out
    monkeypatch.setattr(Trainer, "_train_step", step)
    trainer = Trainer(load_recipe(_quickstart(steps=30, every=10)), None, quiet=True)
    trainer.fit()
    assert sorted(per_step) == list(range(1, 31))
    off_log = {k: v for k, v in per_step.items() if k % 10}
    assert all(v == 0 for v in off_log.values()), (off_log, reads)
    assert all(per_step[k] == 1 for k in (10, 20, 30)), per_step


@pytest.mark.parametrize("bad_step, steps, every", [(3, 20, 10), (10, 20, 10), (12, 20, 10), (70, 100, 50),
                                                    (130, 140, 1000)])
def test_a_non_finite_loss_between_log_steps_still_raises_naming_its_step(monkeypatch, bad_step, steps, every,
                                                                           tmp_path):
    """Found on the next log step (or the checkpoint before it, or the phase end), still named by the
    step it happened at (also after the watched losses were folded on the device, every 64 steps), and
    no checkpoint is written after it."""
    from torchdojo.tasks.classify import Classify
    real = Classify.training_loss
    calls = [0]

    def poisoned(self, model, batch, terms):
        loss, parts = real(self, model, batch, terms)
        calls[0] += 1
        return (loss * float("nan"), parts) if calls[0] == bad_step else (loss, parts)
    monkeypatch.setattr(Classify, "training_loss", poisoned)
    r = _quickstart(steps=steps, every=every)
    r["checkpoint"] = {"every_steps": 4 if steps == 20 else 80, "every_epochs": None, "keep_last": 100}
    with pytest.raises(NonFiniteError, match=rf"step {bad_step} \(phase 'main'\) in: loss"):
        Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert all(s < bad_step for s in saved), saved
