"""Cost of ``labdeck.log()`` per call, beside the floor and the naive approach, in one fresh process.

A child ``python3`` (``PYTHONPATH=backends/runtime``, as in a job) makes 1,000,000
calls of each kind with the same 2-metric dict ``{"loss": …, "acc": …}``, timing
every call with ``time.perf_counter_ns()`` (samples go into an ``array``, so the
timing itself allocates nothing):

* timer only — two ``perf_counter_ns()`` calls, nothing between: the measurement's own cost;
* floor — ``buf.append((time.time(), step, metrics))``: the least any buffered logger can do;
* ``labdeck.log(metrics)`` — automatic step; its writer thread runs meanwhile and
  writes to ``$LABDECK_METRICS_FILE`` (on the scratch disk), competing for the GIL as it would in training;
* ``labdeck.log(metrics, step=i)`` — explicit step;
* naive, buffered — ``f.write(json.dumps({"t": time.time(), "s": i, "m": metrics}) + "\\n")``;
* naive, a write per call — the same line with ``os.write`` on an ``O_APPEND`` fd (what a
  logger that must not lose points to a crash does without a writer thread).

Reported: p50/p90/p99/p99.9/max per call (raw, timer included) and, from a second
untimed loop of as many calls, the mean wall time per call (for labdeck that includes
the writer thread's share of the GIL: the sustained cost). After each labdeck variant
the child flushes and counts the lines in the file: every point must be there.
For scale, the issue quotes trackio at 9.8 µs and wandb at 89 µs per call (not measured here).

Target: ``labdeck.log()`` p50 ≤ 5 µs.

Run: ``python3 -m tests.benchmarks runtime`` (or ``python3 -m tests.benchmarks.bench_runtime``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from ._common import REPO_ROOT, Verdict, console, finish, new_table, scratch_dir, verdict

NAME = "runtime"
CALLS = 1_000_000
WARMUP = 10_000
TARGET_P50_US = 5.0
RUNTIME_DIR = REPO_ROOT / "backends" / "runtime"
CHILD_TIMEOUT_S = 600

CHILD = r'''
import array, gc, json, os, sys, time
import labdeck

N, WARM, SCRATCH = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pc = time.perf_counter_ns
tm = time.time
metrics = {"loss": 0.3127, "acc": 0.9042}
QS = (50, 90, 99, 99.9)


def stats(samples, loop_ns, extra=None):
    s = sorted(samples)
    n = len(s)
    out = {"n": n, "mean_ns": sum(s) / n, "max_ns": s[-1], "loop_ns_per_call": loop_ns}
    for q in QS:
        out[f"p{q:g}_ns"] = s[min(n - 1, int(round((n - 1) * q / 100.0)))]
    out.update(extra or {})
    return out


def timed(body_name, n):
    """Per-call samples of one body (each body is its own loop: no call indirection is timed)."""
    s = array.array("q", bytes(8 * n))
    gc.collect()
    if body_name == "timer":
        for i in range(n):
            t0 = pc(); t1 = pc(); s[i] = t1 - t0
    elif body_name == "floor":
        buf = []; ap = buf.append
        for i in range(n):
            t0 = pc(); ap((tm(), i, metrics)); t1 = pc(); s[i] = t1 - t0
        del buf
    elif body_name == "log":
        log = labdeck.log
        for i in range(n):
            t0 = pc(); log(metrics); t1 = pc(); s[i] = t1 - t0
    elif body_name == "log_step":
        log = labdeck.log
        for i in range(n):
            t0 = pc(); log(metrics, step=i); t1 = pc(); s[i] = t1 - t0
    elif body_name == "naive_buffered":
        dumps = json.dumps
        with open(os.path.join(SCRATCH, "naive-buffered.jsonl"), "a") as f:
            w = f.write
            for i in range(n):
                t0 = pc(); w(dumps({"t": tm(), "s": i, "m": metrics}) + "\n"); t1 = pc(); s[i] = t1 - t0
    elif body_name == "naive_write":
        dumps = json.dumps; write = os.write
        fd = os.open(os.path.join(SCRATCH, "naive-write.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for i in range(n):
            t0 = pc(); write(fd, (dumps({"t": tm(), "s": i, "m": metrics}) + "\n").encode()); t1 = pc(); s[i] = t1 - t0
        os.close(fd)
    return s


def untimed(body_name, n):
    gc.collect()
    t = pc()
    if body_name == "timer":
        for i in range(n):
            pass
    elif body_name == "floor":
        buf = []; ap = buf.append
        for i in range(n):
            ap((tm(), i, metrics))
    elif body_name == "log":
        log = labdeck.log
        for i in range(n):
            log(metrics)
    elif body_name == "log_step":
        log = labdeck.log
        for i in range(n):
            log(metrics, step=i)
    elif body_name == "naive_buffered":
        dumps = json.dumps
        with open(os.path.join(SCRATCH, "naive-buffered.jsonl"), "a") as f:
            w = f.write
            for i in range(n):
                w(dumps({"t": tm(), "s": i, "m": metrics}) + "\n")
    elif body_name == "naive_write":
        dumps = json.dumps; write = os.write
        fd = os.open(os.path.join(SCRATCH, "naive-write.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for i in range(n):
            write(fd, (dumps({"t": tm(), "s": i, "m": metrics}) + "\n").encode())
        os.close(fd)
    return (pc() - t) / n


def count_lines(path):
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


results = {}
logged = 0
for name in ("timer", "floor", "log", "log_step", "naive_buffered", "naive_write"):
    timed(name, WARM)
    if name.startswith("log"):
        logged += WARM
    samples = timed(name, N)
    extra = {}
    if name.startswith("log"):
        t = pc(); ok = labdeck.flush(120); extra["flush_after_timed_ms"] = (pc() - t) / 1e6
    loop = untimed(name, N)
    if name.startswith("log"):
        t = pc(); ok = labdeck.flush(120) and ok; extra["flush_after_loop_ms"] = (pc() - t) / 1e6
        logged += 2 * N
        extra["flush_ok"] = ok
        extra["points_logged_so_far"] = logged
        extra["lines_in_file"] = count_lines(os.environ["LABDECK_METRICS_FILE"])
        extra["lost"] = labdeck.lost
    results[name] = stats(samples, loop, extra)
    del samples
print(json.dumps({"python": sys.version.split()[0], "switch_interval_s": sys.getswitchinterval(), "results": results}))
'''

LABELS = {
    "timer": "timer only",
    "floor": "floor: list.append(tuple)",
    "log": "labdeck.log(m)",
    "log_step": "labdeck.log(m, step=i)",
    "naive_buffered": "naive: dumps + f.write",
    "naive_write": "naive: dumps + os.write",
}


def measure(calls: int, warmup: int, scratch) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}
    env.update({"PYTHONPATH": str(RUNTIME_DIR), "LABDECK_METRICS_FILE": str(scratch / "metrics.jsonl"),
                "LABDECK_RUN_ID": "BENCH", "LABDECK_RUN_DIR": str(scratch / "runs" / "BENCH")})
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(calls), str(warmup), str(scratch)], env=env, cwd=scratch,
                         capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({res.returncode}):\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["child_stderr"] = res.stderr
    out["child_s"] = time.perf_counter() - t
    return out


def us(ns: float) -> str:
    v = ns / 1000.0
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def main(quick: bool = False) -> list[Verdict]:
    calls = CALLS if not quick else 20_000
    warmup = WARMUP if not quick else 1_000
    with scratch_dir("runtime") as scratch:
        console.print(f"[dim]runtime: {calls:,} calls per variant in one child process …[/]")
        out = measure(calls, warmup, scratch)
    r = out["results"]

    table = new_table(
        f"labdeck.log() cost per call ({calls:,} calls each, 2-metric dict, Python {out['python']}; "
        f"target: p50 ≤ {TARGET_P50_US:g} µs)",
        ["Variant", ("p50 µs", "right"), ("p90 µs", "right"), ("p99 µs", "right"), ("p99.9 µs", "right"),
         ("max µs", "right"), ("loop µs/call", "right"), ("p50 vs naive", "right"), "Written, last flush", "Target"],
    )
    verdicts: list[Verdict] = []
    naive = r["naive_write"]["p50_ns"]
    for name, st in r.items():
        is_log = name.startswith("log")
        written = ""
        if is_log:
            good = st["lines_in_file"] == st["points_logged_so_far"] and st["flush_ok"] and not st["lost"]
            written = (f"{'[green]' if good else '[red]'}{st['lines_in_file']:,}/{st['points_logged_so_far']:,}[/]"
                       f", {st['flush_after_loop_ms']:,.0f} ms")
        met = st["p50_ns"] / 1000.0 <= TARGET_P50_US if is_log else None
        ratio = naive / st["p50_ns"]
        speed = "" if name == "timer" else ("baseline" if name == "naive_write" else
                                            f"{ratio:.0f}× less" if ratio >= 10 else f"{ratio:.1f}× less")
        table.add_row(LABELS[name], us(st["p50_ns"]), us(st["p90_ns"]), us(st["p99_ns"]), us(st["p99.9_ns"]),
                      us(st["max_ns"]), us(st["loop_ns_per_call"]), speed, written, verdict(met))
        if met is not None:
            verdicts.append(Verdict(NAME, f"{LABELS[name]} p50", f"{st['p50_ns'] / 1000:.2f} µs",
                                    f"≤ {TARGET_P50_US:g} µs", met))
    console.print(table)
    console.print(f"[dim]per-call times include the timer (see its row); loop µs/call: an untimed loop of as many "
                  f"calls, labdeck's including its writer thread's share of the GIL (switch interval "
                  f"{out['switch_interval_s'] * 1000:g} ms); the issue quotes trackio 9.8 µs, wandb 89 µs per call; "
                  f"child took {out['child_s']:.0f} s[/]")
    if out["child_stderr"].strip():
        console.print(f"[yellow]child stderr:[/] {out['child_stderr'].strip()}")
    return finish(NAME, {
        "description": "labdeck.log() per-call cost vs list.append floor and json.dumps + write per call, one child process",
        "params": {"calls": calls, "warmup": warmup, "metrics": {"loss": 0.3127, "acc": 0.9042}},
        "target": {"metric": "labdeck.log p50", "max_us": TARGET_P50_US},
        "python": out["python"],
        "results": r,
        "child_stderr": out["child_stderr"],
    }, verdicts, out["child_s"], quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
