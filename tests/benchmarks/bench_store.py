"""Store state-change latency: labdeck's Store beside plain TinyDB, at 100, 1,000 and 10,000 runs.

Each size gets one fresh labdeck store with default settings (fsync on), one
with fsync off, and one plain ``TinyDB(path)`` (default JSONStorage, which
rewrites and fsyncs the whole file on every write), all seeded with the same
realistic run documents. Then the same sequence of state changes runs against
each, interleaved round-robin so machine noise hits all three alike: fresh
(queued) runs go through their life, alternating a transition with a plain
field update::

    transition → syncing, update last_line, transition → running (pid, started_at),
    update last_line/log_offset, transition → succeeded (exit_code, ended_at), update log_offset

labdeck does them with ``Store.transition`` / ``Store.update_run`` (the
lock, catch-up, state-machine check, journal append + fdatasync and the Run
returned); plain TinyDB with one ``table.update(fn, doc_ids=[id])`` per change
(the read, the state check, the full rewrite).

Target: labdeck p50 ≤ 20 ms at 10,000 runs.

Run: ``python3 -m tests.benchmarks store`` (or ``python3 -m tests.benchmarks.bench_store``).
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinydb import TinyDB

from backends.models import check_transition, utcnow
from backends.store import Store

from ._common import (Verdict, console, filesystem_of, finish, fmt_ms, make_run, maybe_parent, new_table, pick_final_state,
                      scratch_dir, summarize, timeline_ms, verdict)

NAME = "store"
SIZES = (100, 1_000, 10_000)
MEASURED = 200  # measured state changes per store and size
WARMUP = 6  # one fresh run's whole life, not measured
FRESH = 40  # queued runs per store (each takes 6 changes: 40 cover WARMUP + MEASURED)
TINYDB_MIN = 30  # plain TinyDB may get fewer measured changes at 10k runs (it is slow), never fewer than this
TINYDB_BUDGET_S = 15.0  # ... about this much time in total per size
COMPACTIONS = 3  # compactions timed per size (labdeck, default settings)
TARGET_P50_MS = 20.0
TARGET_AT = 10_000
USER = "bench"


@dataclass(frozen=True)
class Op:
    kind: str  # "transition" | "update"
    run_id: str
    state: str | None
    fields: dict[str, Any]


def seed_docs(n: int, rng: random.Random) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """``n`` run documents of one user: the newest FRESH are queued, the rest finished; and the queued ids."""
    fresh = min(FRESH, n)
    times = timeline_ms(rng, n)
    docs = []
    for i, ms in enumerate(times):
        state = "queued" if i >= n - fresh else pick_final_state(rng)
        run = make_run(rng, user=USER, created_ms=ms, state=state, index=i,
                       parent=maybe_parent(rng, [rid for rid, _ in docs[-50:]]))
        docs.append((run.id, run.to_dict()))
    return docs, [rid for rid, _ in docs[n - fresh:]]


def lifecycle_ops(fresh_ids: list[str], rng: random.Random) -> list[Op]:
    """Six alternating changes per fresh run: transition, update, transition, update, ..."""
    ops: list[Op] = []
    for rid in fresh_ids:
        step = rng.randrange(100, 5000)
        ops += [
            Op("transition", rid, "syncing", {"state_reason": ""}),
            Op("update", rid, None, {"last_line": f"syncing {rng.randrange(100, 5000):,} files to gpu-a100-1…"}),
            Op("transition", rid, "running", {"pid": rng.randrange(1000, 4_000_000), "started_at": utcnow()}),
            Op("update", rid, None, {"last_line": f"epoch 1/10 step {step} loss {rng.uniform(0.1, 3):.4f} acc 0.412",
                                     "log_offset": step * 97}),
            Op("transition", rid, "succeeded", {"exit_code": 0, "ended_at": utcnow(),
                                                "last_line": "saved checkpoint to ckpt/final.pt"}),
            Op("update", rid, None, {"log_offset": step * 97 + 4096}),
        ]
    return ops


class LabdeckStore:
    def __init__(self, label: str, root: Path, docs: list[tuple[str, dict[str, Any]]], *, fsync: bool) -> None:
        self.label = label
        self.store = Store(root / "team", USER, fsync=fsync)  # compact_every: the default
        t = time.perf_counter()
        self.store.mine.put_many("runs", docs)
        self.store.mine.compact()  # the realistic resting state: one snapshot, an empty journal
        self.seed_s = time.perf_counter() - t
        self.file_bytes = self.store.mine.snapshot_path.stat().st_size

    def do(self, op: Op) -> None:
        if op.kind == "transition":
            self.store.transition(op.run_id, op.state, **op.fields)
        else:
            self.store.update_run(op.run_id, **op.fields)

    def close(self) -> None:
        self.store.close()


class PlainTinyDB:
    def __init__(self, label: str, root: Path, docs: list[tuple[str, dict[str, Any]]]) -> None:
        self.label = label
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "plain.json"
        t = time.perf_counter()
        self.db = TinyDB(self.path)  # default JSONStorage
        self.table = self.db.table("runs")
        ids = self.table.insert_multiple(dict(d) for _, d in docs)
        self.seed_s = time.perf_counter() - t
        self.doc_id = {rid: i for (rid, _), i in zip(docs, ids)}
        self.file_bytes = self.path.stat().st_size

    def do(self, op: Op) -> None:
        def change(doc: dict[str, Any]) -> None:
            if op.kind == "transition":
                doc["state"] = check_transition(doc["state"], op.state).value
            doc.update(op.fields)

        self.table.update(change, doc_ids=[self.doc_id[op.run_id]])

    def close(self) -> None:
        self.db.close()


@dataclass
class Series:
    target: Any
    n_ops: int
    warm: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)


def measure_size(n: int, root: Path, rng: random.Random, measured: int) -> dict[str, Any]:
    docs, fresh_ids = seed_docs(n, rng)
    ops = lifecycle_ops(fresh_ids, rng)
    assert len(ops) >= WARMUP + measured, "not enough fresh runs for the measured changes"
    doc_bytes = statistics.mean(len(json.dumps(d, separators=(",", ":"))) for _, d in docs)

    series = {
        "labdeck": Series(LabdeckStore("labdeck", root / f"{n}-fsync", docs, fsync=True), measured),
        "labdeck-nofsync": Series(LabdeckStore("labdeck-nofsync", root / f"{n}-nofsync", docs, fsync=False), measured),
        "tinydb": Series(PlainTinyDB("tinydb", root / f"{n}-tinydb", docs), measured),
    }
    gc.collect()
    gc.freeze()  # the seeded documents are long-lived: keep full collections of them out of the timings
    try:
        # warm-up: one fresh run's whole life on each, interleaved
        for op in ops[:WARMUP]:
            for s in series.values():
                t = time.perf_counter()
                s.target.do(op)
                s.warm.append(time.perf_counter() - t)
        tiny = series["tinydb"]
        est = statistics.median(tiny.warm)
        tiny.n_ops = min(measured, max(TINYDB_MIN, int(TINYDB_BUDGET_S / max(est, 1e-6))))
        # measured: round-robin over the stores, same changes in the same order
        for i, op in enumerate(ops[WARMUP:WARMUP + measured]):
            for s in series.values():
                if i >= s.n_ops:
                    continue
                t = time.perf_counter()
                s.target.do(op)
                s.samples.append(time.perf_counter() - t)
        # compaction (every compact_every journal entries), default settings
        lab = series["labdeck"].target
        compact_times = []
        for _ in range(COMPACTIONS):
            t = time.perf_counter()
            lab.store.mine.compact()
            compact_times.append(time.perf_counter() - t)
        compact_every = lab.store.mine.compact_every
    finally:
        gc.unfreeze()
        for s in series.values():
            s.target.close()

    out: dict[str, Any] = {"runs": n, "avg_doc_bytes": round(doc_bytes), "stores": {}}
    for name, s in series.items():
        out["stores"][name] = {"seed_s": s.target.seed_s, "file_bytes": s.target.file_bytes,
                               "warmup_ms": [round(x * 1000, 3) for x in s.warm], **summarize(s.samples)}
    out["compaction"] = {"compact_every": compact_every, **summarize(compact_times)}
    return out


LABELS = {
    "labdeck": "labdeck (default: fsync on)",
    "labdeck-nofsync": "labdeck (fsync off)",
    "tinydb": "plain TinyDB (JSONStorage)",
}


def main(quick: bool = False) -> list[Verdict]:
    sizes = SIZES if not quick else (100, 1_000)
    measured = MEASURED if not quick else 30
    rng = random.Random(20240501)
    results = []
    t_all = time.perf_counter()
    with scratch_dir("store") as root:
        fs = filesystem_of(root)
        for n in sizes:
            console.print(f"[dim]store: {n:,} runs …[/]")
            results.append(measure_size(n, root, rng, measured))
    elapsed = time.perf_counter() - t_all

    table = new_table(
        f"Store state-change latency (Store.transition / update_run; {measured} changes per store; "
        f"target: labdeck p50 ≤ {TARGET_P50_MS:g} ms at {TARGET_AT:,} runs)",
        [("Runs", "right"), "Store", ("Changes", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
         ("mean ms", "right"), ("max ms", "right"), ("p50 vs TinyDB", "right"), ("File", "right"), "Target"],
    )
    verdicts: list[Verdict] = []
    for r in results:
        base = r["stores"]["tinydb"]["p50_ms"]
        for i, (name, st) in enumerate(r["stores"].items()):
            is_lab = name.startswith("labdeck")
            speed = f"{base / st['p50_ms']:.0f}× faster" if is_lab and st["p50_ms"] > 0 else "baseline"
            met = st["p50_ms"] <= TARGET_P50_MS if is_lab and r["runs"] == TARGET_AT else None
            table.add_row(f"{r['runs']:,}" if i == 0 else "", LABELS[name], str(st["n"]), fmt_ms(st["p50_ms"]),
                          fmt_ms(st["p99_ms"]), fmt_ms(st["mean_ms"]), fmt_ms(st["max_ms"]), speed,
                          f"{st['file_bytes'] / 1e6:.2f} MB", verdict(met))
            if met is not None:
                verdicts.append(Verdict(NAME, f"{LABELS[name]} p50 @ {r['runs']:,} runs", f"{st['p50_ms']:.2f} ms",
                                        f"≤ {TARGET_P50_MS:g} ms", met))
        c = r["compaction"]
        table.add_row("", f"[dim]labdeck compaction (every {c['compact_every']:,} entries)[/]", str(c["n"]),
                      f"[dim]{fmt_ms(c['p50_ms'])}[/]", "", "", f"[dim]{fmt_ms(c['max_ms'])}[/]",
                      f"[dim]+{c['p50_ms'] / c['compact_every']:.3f} ms/change amortized[/]", "", "", end_section=True)
    console.print(table)
    console.print(f"[dim]avg run document {results[-1]['avg_doc_bytes']} B of JSON; scratch on {fs}; "
                  f"plain TinyDB gets fewer changes at 10k runs (≥ {TINYDB_MIN}, ~{TINYDB_BUDGET_S:g} s budget); "
                  f"took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "Store.transition/update_run latency vs plain TinyDB JSONStorage, same documents and changes",
        "params": {"sizes": list(sizes), "measured": measured, "warmup": WARMUP, "tinydb_min": TINYDB_MIN,
                   "tinydb_budget_s": TINYDB_BUDGET_S, "scratch_fs": fs},
        "target": {"metric": "labdeck (fsync on) p50", "max_ms": TARGET_P50_MS, "at_runs": TARGET_AT},
        "results": results,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
