"""Run filter language: parse + filter at 100 and 10,000 runs.

Each size gets realistic runs (``_common.make_run``: ~10 params, a command,
times that fit the state) with metric summaries (``val_loss``, ``train_loss``,
``accuracy``: last/min/max/best/count/last_step), instance info (provider,
GPU summary text), a commit, tag and note annotations from several users
(some tags taken off again) and lineage (``Run.parent`` for ~30% of runs plus
extra "uses" edges). Five filters are timed:

* ``4 terms``: ``lr>1e-3 metric.val_loss<1 user:alice tag:best`` (param, metric, user, tag);
* ``4 terms, tag first``: the same terms in the slowest order (every run's tags are worked out);
* ``bare word``: ``resnet`` (substring of name/command/id suffix/user);
* ``or/not/duration``: ``(state:failed OR state:preempted) -user:bob duration>1h``;
* ``params+date``: ``params.optimizer=adamw precision!=fp32 created>=DATE`` (DATE ≈ 60 days back);
* ``lineage``: ``descendants:ID`` for a run with many descendants.

For each: ``parse`` alone; parse + filter with a fresh ``QueryContext`` each
time (what a filter box does on each keystroke: ``filter_runs``, indexes built
from scratch: "cold"); and the compiled predicate over the runs with a warm
context ("warm"). Baseline in the same run, for the 4-term filter: a
hand-written list comprehension doing the same tests (tags precomputed, as a
fixed-purpose filter would have them).

Target: ``4 terms`` (both orders) parse + filter (cold) p50 ≤ 100 ms at 10,000 runs.

Run: ``python3 -m tests.benchmarks query`` (or ``python3 -m tests.benchmarks.bench_query``).
"""

from __future__ import annotations

import gc
import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from backends.models import Annotation, Edge, Run
from backends.query import QueryContext, filter_runs, parse

from ._common import (Verdict, console, finish, fmt_ms, iso, make_run, maybe_parent, new_table, pick_final_state, summarize,
                      timeline_ms, verdict)

NAME = "query"
SIZES = (100, 10_000)
TARGET_MS = 100.0
TARGET_AT = 10_000
REPEATS = {100: 200, 10_000: 30}
USERS = ("alice", "bob", "carol", "dan", "erin", "frank")
TAGS = ("best", "keep", "paper", "broken", "baseline-v2")
FOUR_TERMS = "lr>1e-3 metric.val_loss<1 user:alice tag:best"
FOUR_TERMS_TAG_FIRST = "tag:best user:alice metric.val_loss<1 lr>1e-3"  # the slowest order: every run's tags


def make_corpus(n: int, rng: random.Random) -> tuple[list[Run], dict[str, list[Annotation]], list[Edge]]:
    """``n`` realistic runs with metric summaries, instance info and commits; tag and note annotations;
    lineage edges."""
    runs: list[Run] = []
    ids: list[str] = []
    now_ms = int(time.time() * 1000)
    for i, ms in enumerate(timeline_ms(rng, n, end_ms=now_ms - 3_600_000)):
        state = "running" if rng.random() < 0.05 else pick_final_state(rng)
        run = make_run(rng, user=rng.choice(USERS), created_ms=ms, state=state, index=i, parent=maybe_parent(rng, ids))
        if state == "running":
            run.started_at = iso(ms + 30_000)
        if run.started_at:
            summary: dict[str, dict[str, Any]] = {}
            for metric, lo in (("val_loss", True), ("train_loss", True), ("accuracy", False)):
                a, b = sorted((rng.uniform(0.05, 3.0) if lo else rng.uniform(0.1, 0.99)) for _ in range(2))
                last = rng.uniform(a, b)
                count = rng.randrange(10, 50_000)
                summary[metric] = {"last": last, "last_step": count * 10, "min": a, "max": b,
                                   "best": a if lo else b, "count": count}
            run.metrics_summary = summary
        gpus = rng.choice((0, 1, 2, 4, 8))
        run.instance_info = {"provider": rng.choice(("lambda", "aws", "local")), "provider_type": "ssh",
                             "gpus": f"{gpus}× NVIDIA A100 80GB" if gpus else "none", "vcpus": 32}
        run.code = {"commit": f"{rng.getrandbits(160):040x}", "dirty": rng.random() < 0.2}
        runs.append(run)
        ids.append(run.id)
    annotations: dict[str, list[Annotation]] = {}
    for run in runs:
        if rng.random() < 0.35:
            t0 = datetime.fromisoformat(run.created_at.replace("Z", "+00:00"))
            anns = []
            for k in range(rng.randrange(1, 4)):
                when = iso(int((t0 + timedelta(hours=k + 1)).timestamp() * 1000))
                anns.append(Annotation(run.id, "tag", rng.choice(TAGS), user=rng.choice(USERS), created_at=when))
            if rng.random() < 0.2:  # its author takes a tag off again (as lineage.untag does)
                anns[0].removed = True
            if rng.random() < 0.5:
                anns.append(Annotation(run.id, "note", rng.choice(("diverged after warmup", "good baseline",
                                                                   "rerun with bf16", "use for the paper")),
                                       user=rng.choice(USERS), created_at=run.created_at))
            annotations[run.id] = anns
    edges = [Edge(rng.choice(ids[:i]), ids[i], kind="uses") for i in range(1, n) if rng.random() < 0.05]
    return runs, annotations, edges


def busiest_root(runs: list[Run], edges: list[Edge]) -> str:
    """The run with the most descendants (a good lineage query)."""
    ctx = QueryContext({r.id: r for r in runs}, {}, edges)
    best, best_n = runs[0].id, -1
    for r in runs[: max(1, len(runs) // 10)]:  # the oldest runs: most things derive from them
        n = len(ctx.descendants(r.id))
        if n > best_n:
            best, best_n = r.id, n
    return best


def baseline_four_terms(runs: list[Run], tags: dict[str, frozenset[str]]) -> list[Run]:
    out = []
    for r in runs:
        lr = r.params.get("lr")
        if not isinstance(lr, (int, float)) or not lr > 1e-3:
            continue
        s = r.metrics_summary.get("val_loss")
        if s is None or not s["last"] < 1:
            continue
        if r.user.lower() != "alice" or "best" not in tags[r.id]:
            continue
        out.append(r)
    return out


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, Any], Any]:
    samples, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t)
    return summarize(samples), result


def measure_size(n: int, rng: random.Random, repeats: int) -> dict[str, Any]:
    runs, annotations, edges = make_corpus(n, rng)
    by_id = {r.id: r for r in runs}
    since = (datetime.now(timezone.utc) - timedelta(days=60)).date().isoformat()
    queries = {
        "4 terms": FOUR_TERMS,
        "4 terms, tag first": FOUR_TERMS_TAG_FIRST,
        "bare word": "resnet",
        "or/not/duration": "(state:failed OR state:preempted) -user:bob duration>1h",
        "params+date": f"params.optimizer=adamw precision!=fp32 created>={since}",
        "lineage": f"descendants:{busiest_root(runs, edges)}",
    }
    out: dict[str, Any] = {"runs": n, "annotated_runs": len(annotations), "edges": len(edges), "queries": {}}
    gc.collect()
    gc.freeze()
    try:
        for label, text in queries.items():
            parse_s, _ = timed(lambda: parse(text), repeats)
            cold, matched = timed(lambda: filter_runs(text, runs, annotations, edges), repeats)
            q = parse(text)
            ctx = QueryContext(by_id, annotations, edges)
            pred = q.predicate(ctx)
            warm, _ = timed(lambda: [r for r in runs if pred(r)], repeats)
            out["queries"][label] = {"text": text, "matched": len(matched), "parse": parse_s, "cold": cold,
                                     "warm": warm}
        tag_ctx = QueryContext(by_id, annotations, edges)
        tags = {r.id: tag_ctx.tags_of(r) for r in runs}
        base, got = timed(lambda: baseline_four_terms(runs, tags), repeats)
        assert len(got) == out["queries"]["4 terms"]["matched"], "the baseline disagrees with the filter"
        out["baseline_4_terms"] = base
    finally:
        gc.unfreeze()
    return out


def main(quick: bool = False) -> list[Verdict]:
    sizes = SIZES
    rng = random.Random(20261101)
    results = []
    t_all = time.perf_counter()
    for n in sizes:
        repeats = max(3, REPEATS[n] // 10) if quick else REPEATS[n]
        console.print(f"[dim]query: {n:,} runs …[/]")
        results.append(measure_size(n, rng, repeats))
    elapsed = time.perf_counter() - t_all

    table = new_table(
        f"Run filter: parse, parse + filter_runs (fresh context: cold), compiled predicate (warm context) "
        f"(target: '4 terms' cold p50 ≤ {TARGET_MS:g} ms at {TARGET_AT:,} runs)",
        [("Runs", "right"), "Filter", ("Matched", "right"), ("parse p50 ms", "right"), ("cold p50 ms", "right"),
         ("cold p99 ms", "right"), ("warm p50 ms", "right"), ("µs/run cold", "right"), "Target"])
    verdicts: list[Verdict] = []
    for r in results:
        for i, (label, q) in enumerate(r["queries"].items()):
            met = q["cold"]["p50_ms"] <= TARGET_MS if label.startswith("4 terms") and r["runs"] == TARGET_AT else None
            table.add_row(f"{r['runs']:,}" if i == 0 else "", label, f"{q['matched']:,}", fmt_ms(q["parse"]["p50_ms"]),
                          fmt_ms(q["cold"]["p50_ms"]), fmt_ms(q["cold"]["p99_ms"]), fmt_ms(q["warm"]["p50_ms"]),
                          f"{q['cold']['p50_ms'] * 1000 / r['runs']:.2f}", verdict(met))
            if met is not None:
                verdicts.append(Verdict(NAME, f"'{label}' parse + filter p50 @ {r['runs']:,} runs",
                                        f"{q['cold']['p50_ms']:.2f} ms", f"≤ {TARGET_MS:g} ms", met))
        b = r["baseline_4_terms"]
        four = r["queries"]["4 terms"]["cold"]["p50_ms"]
        table.add_row("", "[dim]baseline: hand-written 4-term loop[/]", "", "", f"[dim]{fmt_ms(b['p50_ms'])}[/]",
                      f"[dim]{fmt_ms(b['p99_ms'])}[/]", "", f"[dim]{four / b['p50_ms']:.1f}× the baseline[/]"
                      if b["p50_ms"] > 0 else "", "", end_section=True)
    console.print(table)
    console.print(f"[dim]{results[-1]['annotated_runs']:,} annotated runs and {results[-1]['edges']:,} extra edges "
                  f"at {results[-1]['runs']:,} runs; took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "backends.query: parse, parse + filter_runs with a fresh context, compiled predicate",
        "params": {"sizes": list(sizes), "repeats": {n: (max(3, REPEATS[n] // 10) if quick else REPEATS[n])
                                                     for n in sizes}},
        "target": {"metric": "'4 terms' parse + filter_runs p50", "max_ms": TARGET_MS, "at_runs": TARGET_AT},
        "results": results,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
