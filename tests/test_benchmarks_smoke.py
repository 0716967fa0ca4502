"""Every benchmark script runs end to end in its smoke mode (tiny sizes, one seed, seconds), so a broken
benchmark fails CI instead of the next `make bench`.

The scripts are found the way `make bench` finds them (`run_all.benchmark_scripts`: every
`benchmarks/*.py` but run_all.py and `_*.py`), so a new benchmark is covered without editing this file.
Marked `slow`: `make test` leaves them out, `make test-slow` and `.ci/run` run them
(`pytest -m slow tests/test_benchmarks_smoke.py` by hand).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"


def _load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = _load_run_all()


@pytest.mark.slow
@pytest.mark.parametrize("script", run_all.benchmark_scripts(), ids=lambda p: p.stem)
def test_benchmark_runs_in_smoke_mode(script):
    # A subprocess with OMP_NUM_THREADS=1 and `--smoke`, as `run_all.py --smoke` runs it: ok means exit
    # status 0 and a JSON object as the last stdout line.
    r = run_all.run_one(script, timeout=300, smoke=True)
    assert r["ok"], f"{script.name} --smoke: {r['problem']}\n{r['stderr_tail']}"
    assert isinstance(r["figures"], dict)
