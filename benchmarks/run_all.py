"""Run every benchmark and rewrite BENCHMARKS.md (`make bench`).

Each `benchmarks/*.py` script other than this one and files starting with `_` runs in its own
subprocess with this interpreter. Its last stdout line must be one JSON object with its figures; the
rest of its stdout is its human-readable report. A benchmark that exits non-zero, times out or ends
without a JSON line is reported as failed in BENCHMARKS.md, the others still run, and this script
exits 1 at the end.

With `--only NAME ... --merge`, the other benchmarks' sections of the existing output file are kept as
they are (each says its own figures; the header lists which sections come from an earlier run).

With `--smoke`, every benchmark runs in its smoke mode (tiny sizes, one seed, seconds, one thread) to check
that it runs; BENCHMARKS.md is left alone, as smoke figures mean nothing.

Usage: python benchmarks/run_all.py [--only NAME ... [--merge]] [--smoke] [--timeout SECONDS] [--output PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def benchmark_scripts() -> list[Path]:
    me = Path(__file__).resolve()
    return sorted(p for p in HERE.glob("*.py") if p.resolve() != me and not p.name.startswith("_"))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info() -> dict:
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.lower().startswith("model name")), None) or platform.processor() or "unknown"
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), None)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__, torch.get_num_threads())"],
        capture_output=True, text=True).stdout.split()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": round(mem_kb / 2 ** 20, 1) if mem_kb else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "torch": torch_version[0] if torch_version else "not importable",
        "torch_threads": int(torch_version[1]) if len(torch_version) > 1 else None,
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_one(script: Path, timeout: float, smoke: bool = False) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if smoke:       # one thread: smoke runs are checks on a shared CI machine, not timings
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), *(["--smoke"] if smoke else [])], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env=env)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
        timed_out = False
    except subprocess.TimeoutExpired as exc:
        code, timed_out = None, True
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.perf_counter() - start
    lines = out.rstrip("\n").splitlines()
    figures, problem = None, None
    if lines:
        try:
            figures = json.loads(lines[-1])
            if not isinstance(figures, dict):
                figures, problem = None, "the last stdout line is JSON but not an object"
        except json.JSONDecodeError:
            problem = "the last stdout line is not a JSON object"
    else:
        problem = "no output"
    if timed_out:
        problem = f"timed out after {timeout:.0f} s"
    elif code != 0:
        problem = f"exit status {code}"
    report = "\n".join(lines[:-1] if figures is not None else lines)
    try:
        shown = script.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(script)
    return {"name": script.stem, "script": shown, "ok": problem is None,
            "problem": problem, "seconds": seconds, "report": report, "figures": figures,
            "stderr_tail": "\n".join(err.rstrip("\n").splitlines()[-30:])}


def fence(text: str, lang: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def earlier_sections(text: str) -> dict[str, dict]:
    """name -> {status, seconds, text} of each benchmark section of an existing BENCHMARKS.md."""
    rows = {m.group(1): (m.group(2), float(m.group(3)))
            for m in re.finditer(r"^\| \[([\w-]+)\]\(#[\w-]+\) \| (.*?) \| (\d+) \|$", text, re.M)}
    sections = {}
    for chunk in re.split(r"^(?=## )", text, flags=re.M):
        if chunk.startswith("## "):
            name = chunk[3:].splitlines()[0].strip()
            if name in rows:
                sections[name] = {"status": rows[name][0], "seconds": rows[name][1], "text": chunk.rstrip() + "\n"}
    return sections


def render(results: list[dict], machine: dict, started: datetime, kept: dict[str, dict] | None = None) -> str:
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`benchmarks/run_all.py`); do not edit by hand, rerun instead. "
           "Each section is one script in `benchmarks/`: its report and the JSON figures it printed last.", "",
           f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
           f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
           f"{machine['ram_gib']} GiB RAM",
           f"- OS: {machine['os']}; {machine['python']}; torch {machine['torch']} "
           f"({machine['torch_threads']} threads by default)",
           f"- Load average when the run started: {machine['load_average']}", ""]
    kept = kept or {}
    if kept:
        out += [f"- Kept from an earlier run (not rerun this time): {', '.join(sorted(kept))}", ""]
    fresh = {r["name"]: r for r in results}
    out += ["| benchmark | status | seconds |", "| --- | --- | --- |"]
    for name in sorted({*fresh, *kept}):
        if name in fresh:
            r = fresh[name]
            status, seconds = ("ok" if r["ok"] else f"FAILED ({r['problem']})"), r["seconds"]
        else:
            status, seconds = kept[name]["status"], kept[name]["seconds"]
        out.append(f"| [{name}](#{name.lower()}) | {status} | {seconds:.0f} |")
    out.append("")
    for name in sorted({*fresh, *kept}):
        if name not in fresh:
            out += [kept[name]["text"].rstrip(), ""]
            continue
        r = fresh[name]
        out += [f"## {r['name']}", "", f"`{r['script']}`, {r['seconds']:.0f} s."
                + ("" if r["ok"] else f" **FAILED: {r['problem']}.**"), ""]
        if r["report"].strip():
            out += [fence(r["report"]), ""]
        if r["figures"] is not None:
            out += ["Figures:", "", fence(json.dumps(r["figures"], indent=2), "json"), ""]
        if not r["ok"] and r["stderr_tail"].strip():
            out += ["stderr (last lines):", "", fence(r["stderr_tail"]), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names (script stems) to run")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per benchmark (default 1800, 300 with --smoke)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--merge", action="store_true", help="with --only: keep the other benchmarks' sections "
                                                          "of the existing output file")
    ap.add_argument("--smoke", action="store_true", help="run every benchmark in smoke mode; writes no output file")
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 300 if args.smoke else 1800

    scripts = benchmark_scripts()
    if args.only:
        unknown = set(args.only) - {s.stem for s in scripts}
        if unknown:
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
                  f"available: {', '.join(s.stem for s in scripts)}", file=sys.stderr)
            return 2
        scripts = [s for s in scripts if s.stem in args.only]
    started = datetime.now(timezone.utc)
    machine = machine_info()
    results = []
    for script in scripts:
        print(f"== {script.stem} ...", flush=True)
        r = run_one(script, args.timeout, args.smoke)
        results.append(r)
        if r["report"] and not args.smoke:
            print(r["report"])
        print(f"== {script.stem}: {'ok' if r['ok'] else 'FAILED: ' + r['problem']} ({r['seconds']:.0f} s)",
              flush=True)
        if not r["ok"] and r["stderr_tail"]:
            print(r["stderr_tail"], file=sys.stderr)
    failed = [r["name"] for r in results if not r["ok"]]
    tally = f"{len(results)} benchmark(s), {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
    if args.smoke:
        print(f"smoke: {tally}")
        return 1 if failed else 0
    kept = {}
    if args.merge and args.only and args.output.is_file():
        kept = {k: v for k, v in earlier_sections(args.output.read_text()).items() if k not in args.only}
    args.output.write_text(render(results, machine, started, kept))
    print(f"wrote {args.output} ({tally})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
