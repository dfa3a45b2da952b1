"""Run labdeck's benchmarks: ``python3 -m tests.benchmarks [NAME ...] [--quick]``.

NAME is a benchmark's short name (``logview``, ``monitor``, ``remote``, ``runtime``, ``series``, ``store``, ``tui_start``); without one, all
run, in file order. ``--quick`` shrinks every benchmark to a smoke test.
Each prints its table and writes ``tests/benchmarks/results/<name>.json``;
a summary of the targets comes last. The exit status is 0 whether targets are
met or not (these are reports, not tests); it is 1 only if a benchmark crashed.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from pathlib import Path

from ._common import Verdict, console, new_table, verdict

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    return [p.stem.removeprefix("bench_") for p in sorted(HERE.glob("bench_*.py"))]


def main(argv: list[str] | None = None) -> int:
    names = discover()
    ap = argparse.ArgumentParser(prog="python3 -m tests.benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(names)})")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmarks themselves")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(names)})")

    verdicts: list[Verdict] = []
    crashed: list[str] = []
    t0 = time.perf_counter()
    for name in args.names or names:
        console.rule(f"bench_{name}")
        try:
            mod = importlib.import_module(f"{__package__}.bench_{name}")
            verdicts += mod.main(quick=args.quick)
        except Exception:
            crashed.append(name)
            console.print(f"[bold red]bench_{name} crashed:[/]\n{traceback.format_exc()}")

    console.rule("summary")
    table = new_table(f"Targets ({time.perf_counter() - t0:.0f} s in all)", ["Benchmark", "Metric", ("Value", "right"), "Target", "Met"])
    for v in verdicts:
        table.add_row(v.benchmark, v.metric, v.value, v.target, verdict(v.met))
    for name in crashed:
        table.add_row(name, "[red]crashed[/]", "", "", "")
    console.print(table)
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
