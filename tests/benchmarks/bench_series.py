"""Metric series: chart refresh at 1k, 100k and 10M points, and sustained ingest of metric lines.

(a) Chart refresh. One loss-like series (decay, noise, a few spikes; steps 0..n-1)
of 1,000, 100,000 and 10,000,000 points is built with ``Series.extend`` (1M points
a call). A refresh is what the run view does each time: ``Series.view(width=120)``
and a plotext figure of it::

    plt.clf(); plt.plot(x, ymin); plt.plot(x, ymax); plt.plotsize(120, 30); plt.build()

Baseline in the same run: plotext drawing the raw points (``plt.plot(steps,
values)``, same size and build) at 1k and 100k points; skipped at 10M (plotext
takes about 7 s per 1M raw points). Also reported: the time to build each
series, and the rate of plain per-point ``Series.append`` (1M points).

(b) Sustained ingest. ~2M points as ``metrics.jsonl`` lines (``{"t", "s", "m"}``
with 4 metrics a line, as ``labdeck.log()`` writes them), fed in 64 KiB chunks
(as the mirror delivers them) to ``MetricsFileParser.feed`` and
``RunSeries.ingest``; points per second. Baseline: a bare ``json.loads`` of
each line (the floor of any JSON-lines reader in Python).

(c) Zero-code capture. ~1M lines of typical training output (four common
formats: ``key=value`` logging, Keras ``key: value``, HF Trainer dict reprs,
plain text with no metrics) through ``LogMetricParser.feed``; lines per second.
Baseline: a naive ``re.findall(r"(\\w+)=([\\d.]+)")`` over each decoded line.

Targets: refresh p50 ≤ 15 ms at each size; ingest ≥ 50,000 points/s;
zero-code capture ≥ 100,000 lines/s (1M lines in 10 s).

Run: ``python3 -m tests.benchmarks series`` (or ``python3 -m tests.benchmarks.bench_series``).
"""

from __future__ import annotations

import gc
import json
import random
import re
import time
from typing import Any, Callable

import numpy as np
import plotext as plt

from backends.metrics import LogMetricParser, MetricsFileParser, RunSeries, Series

from ._common import Verdict, console, finish, fmt_ms, new_table, summarize, verdict

NAME = "series"
SIZES = (1_000, 100_000, 10_000_000)
QUICK_SIZES = (1_000, 100_000, 1_000_000)
RAW_MAX = 100_000  # plotext of the raw points only up to this size
WIDTH, HEIGHT = 120, 30
REFRESHES = 60
RAW_REPEATS = {1_000: 20, 100_000: 3}
CHUNK_POINTS = 1_000_000
INGEST_LINES = 500_000  # × 4 metrics = 2M points
LOG_LINES = 1_000_000
READ_CHUNK = 64 << 10
TARGET_REFRESH_MS = 15.0
TARGET_INGEST_PPS = 50_000
TARGET_LOG_LPS = 100_000


# ---- (a) chart refresh ------------------------------------------------------------------
def loss_curve(start: int, n: int, total: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(start, start + n, dtype=float)
    v = 0.15 + 2.5 * np.exp(-steps / max(total / 5, 1)) + rng.normal(0, 0.05, n)
    spikes = rng.random(n) < 2e-4
    v[spikes] += rng.uniform(0.5, 3, int(spikes.sum()))
    return steps, v


def build_series(n: int, seed: int) -> tuple[Series, float]:
    rng = np.random.default_rng(seed)
    s = Series()
    took = 0.0
    for start in range(0, n, CHUNK_POINTS):
        steps, vals = loss_curve(start, min(CHUNK_POINTS, n - start), n, rng)
        t = time.perf_counter()
        s.extend(steps, vals)
        took += time.perf_counter() - t
    return s, took


def chart(x: list[float], lo: list[float], hi: list[float]) -> str:
    plt.clf()
    plt.plot(x, lo)
    plt.plot(x, hi)
    plt.plotsize(WIDTH, HEIGHT)
    return plt.build()


def raw_chart(x: list[float], y: list[float]) -> str:
    plt.clf()
    plt.plot(x, y)
    plt.plotsize(WIDTH, HEIGHT)
    return plt.build()


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure_refresh(n: int, refreshes: int) -> dict[str, Any]:
    s, build_s = build_series(n, seed=n)
    gc.collect()
    view_t: list[float] = []
    total_t: list[float] = []

    def refresh() -> None:
        t0 = time.perf_counter()
        x, lo, hi = s.view(WIDTH)
        t1 = time.perf_counter()
        chart(x, lo, hi)
        view_t.append(t1 - t0)
        total_t.append(time.perf_counter() - t0)

    for _ in range(3):
        refresh()
    view_t.clear()
    total_t.clear()
    for _ in range(refreshes):
        refresh()
    x, lo, hi = s.view(WIDTH)
    out: dict[str, Any] = {
        "points": n, "build_s": build_s, "buckets": len(s.view(1 << 30)[0]), "bucket_width": s.bucket_width,
        "columns": len(x), "view": summarize(view_t), "refresh": summarize(total_t), "raw": None,
    }
    if n <= RAW_MAX:
        rng = np.random.default_rng(n)
        steps, vals = loss_curve(0, n, n, rng)
        xs, ys = steps.tolist(), vals.tolist()
        gc.collect()
        out["raw"] = summarize(time_calls(lambda: raw_chart(xs, ys), RAW_REPEATS.get(n, 3), warmup=1))
    return out


def measure_append_rate(n: int) -> float:
    rng = np.random.default_rng(1)
    steps, vals = loss_curve(0, n, n, rng)
    xs, ys = steps.tolist(), vals.tolist()
    s = Series()
    ap = s.append
    t = time.perf_counter()
    for a, b in zip(xs, ys):
        ap(a, b)
    return n / (time.perf_counter() - t)


# ---- (b) ingest ---------------------------------------------------------------------------
def metrics_file_bytes(lines: int, rng: random.Random) -> bytes:
    t0 = 1_714_550_000.0
    out = []
    for i in range(lines):
        loss = 0.15 + 2.5 * 2.718281828 ** (-i / (lines / 5)) + rng.gauss(0, 0.05)
        out.append(json.dumps({"t": round(t0 + i * 0.05, 3), "s": i, "m": {
            "train/loss": loss, "train/acc": min(1.0, max(0.0, 1 - loss / 3 + rng.gauss(0, 0.01))),
            "lr": 3e-4 * min(1.0, (i + 1) / 2000), "grad_norm": abs(rng.gauss(1.0, 0.3))}}, separators=(", ", ": ")))
    return ("\n".join(out) + "\n").encode()


def measure_ingest(lines: int) -> dict[str, Any]:
    data = metrics_file_bytes(lines, random.Random(7))
    chunks = [data[i:i + READ_CHUNK] for i in range(0, len(data), READ_CHUNK)]
    gc.collect()
    # baseline: json.loads of each line
    t = time.perf_counter()
    for ln in data.split(b"\n"):
        if ln:
            json.loads(ln)
    base_s = time.perf_counter() - t
    # parse only
    p = MetricsFileParser()
    t = time.perf_counter()
    n = 0
    for c in chunks:
        n += len(p.feed(c))
    parse_s = time.perf_counter() - t
    # parse + append
    p = MetricsFileParser()
    run = RunSeries()
    gc.collect()
    t = time.perf_counter()
    for c in chunks:
        run.ingest(p.feed(c))
    total_s = time.perf_counter() - t
    assert sum(len(run.series(k)) for k in run.names()) == n and not p.warnings
    return {"lines": lines, "points": n, "bytes": len(data), "json_loads_s": base_s, "parse_s": parse_s,
            "parse_ingest_s": total_s, "points_per_s": n / total_s, "parse_points_per_s": n / parse_s,
            "baseline_lines_per_s": lines / base_s}


# ---- (c) zero-code capture ----------------------------------------------------------------
def log_bytes(lines: int, rng: random.Random) -> bytes:
    out = []
    for i in range(lines):
        loss = rng.uniform(0.1, 3)
        k = i % 4
        if k == 0:
            out.append(f"[2024-05-01 12:{i // 60 % 60:02d}:{i % 60:02d},123] INFO train: step={i} loss={loss:.4f} "
                       f"acc={rng.random():.3f} lr=3.00e-04 grad_norm={rng.uniform(0, 5):.3f} throughput=512.3")
        elif k == 1:
            out.append(f"Epoch 3/10 - {i % 5000}/5000 - 12ms/step - loss: {loss:.4f} - accuracy: {rng.random():.4f}")
        elif k == 2:
            out.append(f"{{'loss': {loss:.4f}, 'grad_norm': {rng.uniform(0, 5):.3f}, 'learning_rate': 5e-05, "
                       f"'epoch': {i / 1e5:.2f}}}")
        else:
            out.append(f"Saving model checkpoint to /data/runs/ckpt-{i} (epoch 3/10, {rng.uniform(50, 900):.0f} "
                       "samples/s) done")
    return ("\n".join(out) + "\n").encode()


def measure_log(lines: int) -> dict[str, Any]:
    data = log_bytes(lines, random.Random(11))
    chunks = [data[i:i + READ_CHUNK] for i in range(0, len(data), READ_CHUNK)]
    naive = re.compile(r"(\w+)=([\d.]+)")
    gc.collect()
    t = time.perf_counter()
    nb = 0
    for ln in data.split(b"\n"):
        nb += len(naive.findall(ln.decode("utf-8", "replace")))
    base_s = time.perf_counter() - t
    p = LogMetricParser()
    gc.collect()
    t = time.perf_counter()
    n = 0
    for c in chunks:
        n += len(p.feed(c))
    n += len(p.flush())
    took = time.perf_counter() - t
    return {"lines": lines, "bytes": len(data), "points": n, "parse_s": took, "lines_per_s": lines / took,
            "naive_regex_s": base_s, "naive_regex_lines_per_s": lines / base_s, "naive_points": nb}


# ---- report -------------------------------------------------------------------------------
def main(quick: bool = False) -> list[Verdict]:
    sizes = QUICK_SIZES if quick else SIZES
    refreshes = 15 if quick else REFRESHES
    t_all = time.perf_counter()
    refresh = []
    for n in sizes:
        console.print(f"[dim]series: {n:,} points …[/]")
        refresh.append(measure_refresh(n, refreshes))
    console.print("[dim]series: per-point append …[/]")
    append_pps = measure_append_rate(100_000 if quick else 1_000_000)
    console.print("[dim]series: ingest …[/]")
    ingest = measure_ingest(25_000 if quick else INGEST_LINES)
    console.print("[dim]series: zero-code capture …[/]")
    logcap = measure_log(50_000 if quick else LOG_LINES)
    elapsed = time.perf_counter() - t_all

    verdicts: list[Verdict] = []
    table = new_table(
        f"Chart refresh: Series.view(width={WIDTH}) + plotext {WIDTH}×{HEIGHT} of min & max ({refreshes} refreshes; "
        f"target: p50 ≤ {TARGET_REFRESH_MS:g} ms at every size)",
        [("Points", "right"), "What", ("view p50 ms", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
         ("max ms", "right"), ("vs raw", "right"), ("Buckets", "right"), ("Build", "right"), "Target"])
    for r in refresh:
        ref = r["refresh"]
        met = ref["p50_ms"] <= TARGET_REFRESH_MS
        raw = r["raw"]
        speed = f"{raw['p50_ms'] / ref['p50_ms']:.0f}× faster" if raw else "—"
        table.add_row(f"{r['points']:,}", "view + plotext", fmt_ms(r["view"]["p50_ms"]), fmt_ms(ref["p50_ms"]),
                      fmt_ms(ref["p99_ms"]), fmt_ms(ref["max_ms"]), speed,
                      f"{r['buckets']:,} × {r['bucket_width']:g}", f"{r['build_s']:.2f} s (extend)", verdict(met))
        verdicts.append(Verdict(NAME, f"refresh p50 @ {r['points']:,} points", f"{ref['p50_ms']:.2f} ms",
                                f"≤ {TARGET_REFRESH_MS:g} ms", met))
        if raw:
            table.add_row("", "[dim]plotext of the raw points[/]", "", f"[dim]{fmt_ms(raw['p50_ms'])}[/]",
                          f"[dim]{fmt_ms(raw['p99_ms'])}[/]", f"[dim]{fmt_ms(raw['max_ms'])}[/]", "baseline", "", "", "",
                          end_section=True)
        else:
            table.add_row("", "[dim]plotext of the raw points[/]", "", "[dim]skipped (~7 s per 1M points)[/]", "", "",
                          "", "", "", "", end_section=True)
    console.print(table)
    console.print(f"[dim]per-point Series.append (no numpy): {append_pps:,.0f} points/s; the Build column is "
                  f"Series.extend, {CHUNK_POINTS:,} points a call[/]")

    met_i = ingest["points_per_s"] >= TARGET_INGEST_PPS
    met_l = logcap["lines_per_s"] >= TARGET_LOG_LPS
    t2 = new_table("Sustained ingest (64 KiB chunks)", ["What", ("Input", "right"), ("Time", "right"),
                                                        ("Rate", "right"), "Target", "Met"])
    t2.add_row("metrics.jsonl → MetricsFileParser.feed + RunSeries.ingest",
               f"{ingest['lines']:,} lines, {ingest['points']:,} points, {ingest['bytes'] / 1e6:.0f} MB",
               f"{ingest['parse_ingest_s']:.2f} s", f"{ingest['points_per_s']:,.0f} points/s",
               f"≥ {TARGET_INGEST_PPS:,} points/s", verdict(met_i))
    t2.add_row("[dim]  of which MetricsFileParser.feed alone[/]", "", f"[dim]{ingest['parse_s']:.2f} s[/]",
               f"[dim]{ingest['parse_points_per_s']:,.0f} points/s[/]", "", "")
    t2.add_row("[dim]  baseline: json.loads of each line[/]", "", f"[dim]{ingest['json_loads_s']:.2f} s[/]",
               f"[dim]{ingest['baseline_lines_per_s']:,.0f} lines/s[/]", "", "", end_section=True)
    t2.add_row("output.log → LogMetricParser.feed", f"{logcap['lines']:,} lines, {logcap['bytes'] / 1e6:.0f} MB",
               f"{logcap['parse_s']:.2f} s", f"{logcap['lines_per_s']:,.0f} lines/s ({logcap['points']:,} points)",
               f"≥ {TARGET_LOG_LPS:,} lines/s", verdict(met_l))
    t2.add_row("[dim]  baseline: naive re.findall(key=number) per line[/]", "", f"[dim]{logcap['naive_regex_s']:.2f} s[/]",
               f"[dim]{logcap['naive_regex_lines_per_s']:,.0f} lines/s[/]", "", "")
    console.print(t2)
    verdicts.append(Verdict(NAME, "metrics-file ingest", f"{ingest['points_per_s']:,.0f} points/s",
                            f"≥ {TARGET_INGEST_PPS:,} points/s", met_i))
    verdicts.append(Verdict(NAME, "zero-code capture", f"{logcap['lines_per_s']:,.0f} lines/s",
                            f"≥ {TARGET_LOG_LPS:,} lines/s", met_l))
    console.print(f"[dim]took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "Series.view + plotext refresh vs raw plotext; metrics-file ingest; zero-code log capture",
        "params": {"sizes": list(sizes), "width": WIDTH, "height": HEIGHT, "refreshes": refreshes,
                   "read_chunk": READ_CHUNK},
        "target": {"refresh_p50_max_ms": TARGET_REFRESH_MS, "ingest_min_points_per_s": TARGET_INGEST_PPS,
                   "log_min_lines_per_s": TARGET_LOG_LPS},
        "refresh": refresh, "append_points_per_s": append_pps, "ingest": ingest, "log_capture": logcap,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
