"""Shared helpers of the benchmarks: realistic run documents, percentiles, tables, JSON results.

Benchmarks report numbers beside a baseline measured in the same run; they are
never pass/fail assertions (the machines they run on are small and noisy).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.table import Table

from backends.models import Run

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[2]

console = Console(highlight=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(highlight=False, width=160)  # piped to a file: keep the tables on one line each


# ---- statistics -------------------------------------------------------------
def percentile(samples: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        return math.nan
    s = sorted(samples)
    rank = (len(s) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def summarize(samples_s: Sequence[float]) -> dict[str, Any]:
    """p50/p99/mean/min/max in milliseconds, plus the raw samples (ms, 3 decimals)."""
    ms = [x * 1000.0 for x in samples_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "min_ms": min(ms) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
        "samples_ms": [round(x, 3) for x in ms],
    }


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def verdict(met: bool | None) -> str:
    if met is None:
        return "—"
    return "[bold green]met[/]" if met else "[bold red]NOT met[/]"


@dataclass
class Verdict:
    """One target of one benchmark, for the runner's summary."""

    benchmark: str
    metric: str
    value: str
    target: str
    met: bool | None


# ---- environment and results ------------------------------------------------
def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "backends", "tui"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "backends_or_tui_modified": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(load),
    }


def write_results(name: str, payload: dict[str, Any], *, quick: bool = False) -> Path:
    """``results/<name>.json`` (``<name>-quick.json`` for --quick, so a smoke test never overwrites a real run)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}{'-quick' if quick else ''}.json"
    doc = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def finish(name: str, payload: dict[str, Any], verdicts: list, elapsed_s: float, *, quick: bool = False) -> list:
    """The end of every benchmark's ``main``: write its results with the verdicts and the time it took,
    say where, and return the verdicts for the summary."""
    path = write_results(name, {**payload, "verdicts": [v.__dict__ for v in verdicts], "elapsed_s": elapsed_s},
                         quick=quick)
    console.print(f"[dim]wrote {path}[/]\n")
    return verdicts


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory on a real disk (fsync must mean something), removed afterwards.

    ``LABDECK_BENCH_TMP`` picks its parent (default: the system temp dir);
    ``LABDECK_BENCH_KEEP=1`` keeps it for a look afterwards.
    """
    parent = os.environ.get("LABDECK_BENCH_TMP") or None
    path = Path(tempfile.mkdtemp(prefix=f"labdeck-bench-{prefix}-", dir=parent))
    try:
        yield path
    finally:
        if os.environ.get("LABDECK_BENCH_KEEP") == "1":
            console.print(f"[dim]kept {path}[/]")
        else:
            shutil.rmtree(path, ignore_errors=True)


def filesystem_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=5).stdout.splitlines()
        return out[1].split()[1] if len(out) > 1 else "?"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def new_table(title: str, columns: Sequence[str | tuple[str, str]]) -> Table:
    """A rich table; a column is a name or (name, justify)."""
    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        name, justify = (c, "left") if isinstance(c, str) else c
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    return t


# ---- realistic run documents ----------------------------------------------------
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32, like backends.ids


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, r = divmod(value, 32)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def ulid_at(ms: int, rng: random.Random) -> str:
    """A ULID for a given time (backends.ids.new_id is monotonic per process, so it cannot go back in time)."""
    return _b32(ms, 10) + _b32(rng.getrandbits(80), 16)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


MODELS = ("resnet50", "vit-b16", "llama-7b-lora", "bert-base", "whisper-small", "unet-sd", "gpt2-medium", "t5-large")
DATASETS = ("imagenet-1k", "cifar100", "c4-en", "librispeech", "laion-400m", "wikitext-103", "squad-v2")
INSTANCES = ("gpu-a100-1", "gpu-a100-2", "h100-spot-3", "l4-dev", "local")
FINAL_MIX = (("succeeded", 70), ("failed", 15), ("cancelled", 8), ("preempted", 4), ("lost", 3))


def make_run(rng: random.Random, *, user: str, created_ms: int, state: str, index: int,
             instance: str | None = None, parent: str | None = None) -> Run:
    """One realistic run: a ~10-key params dict, a command, env, a last log line, times that fit the state."""
    model = rng.choice(MODELS)
    dataset = rng.choice(DATASETS)
    lr = 10 ** rng.uniform(-5, -2)
    bs = rng.choice((16, 32, 64, 128, 256))
    epochs = rng.choice((3, 5, 10, 20, 90))
    seed = rng.randrange(10_000)
    params = {
        "model": model, "dataset": dataset, "lr": round(lr, 7), "batch_size": bs, "epochs": epochs,
        "optimizer": rng.choice(("adamw", "sgd", "lion")), "weight_decay": rng.choice((0.0, 0.01, 0.05, 0.1)),
        "warmup_steps": rng.choice((0, 500, 1000, 2000)), "seed": seed, "precision": rng.choice(("bf16", "fp16", "fp32")),
    }
    inst = instance or rng.choice(INSTANCES)
    rid = ulid_at(created_ms, rng)
    project = f"/home/{user}/projects/{model.split('-')[0]}"
    command = (f"python train.py --model {model} --dataset {dataset} --lr {lr:.2e} --batch-size {bs} "
               f"--epochs {epochs} --seed {seed} --precision {params['precision']}")
    run = Run(command=command, instance=inst, id=rid, name=f"{model}-{dataset}-{index}", user=user,
              origin_host=f"ws-{user}", state=state, workdir=project,
              run_dir=f"/data/labdeck/runs/{rid}" if inst != "local" else f"/home/{user}/.local/share/labdeck/runs/{rid}",
              env={"CUDA_VISIBLE_DEVICES": "0,1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}, parent=parent,
              created_at=iso(created_ms), price_per_hour=0.0 if inst == "local" else rng.choice((1.1, 2.2, 4.5)),
              tags=rng.sample(["sweep", "baseline", "ablation", "prod", "debug", "long"], 2), params=params)
    if state != "queued":
        started = created_ms + rng.randrange(2_000, 60_000)
        run.started_at = iso(started)
        run.pid = rng.randrange(1_000, 4_000_000)
        step = rng.randrange(100, 200_000)
        run.log_offset = step * 97
        run.last_line = (f"epoch {rng.randrange(1, epochs + 1)}/{epochs} step {step} loss {rng.uniform(0.05, 4):.4f} "
                         f"acc {rng.uniform(0.1, 0.99):.3f} lr {lr:.2e} {rng.uniform(50, 900):.0f} samples/s")
        if state in ("succeeded", "failed", "cancelled", "preempted"):
            run.ended_at = iso(started + rng.randrange(60_000, 36 * 3_600_000))
            run.exit_code = 0 if state == "succeeded" else (1 if state == "failed" else None)
            run.state_reason = {"failed": "exit code 1", "cancelled": f"cancelled by {user}",
                                "preempted": "spot instance reclaimed"}.get(state, "")
        elif state == "lost":
            run.state_reason = "run directory is gone from the instance"
    return run


def pick_final_state(rng: random.Random) -> str:
    return rng.choices([s for s, _ in FINAL_MIX], weights=[w for _, w in FINAL_MIX])[0]


def maybe_parent(rng: random.Random, earlier_ids: list[str], share: float = 0.3) -> str | None:
    """About ``share`` of runs derive from a recent earlier run (a rerun or the next step of a sweep)."""
    if earlier_ids and rng.random() < share:
        return rng.choice(earlier_ids[-50:])
    return None


def timeline_ms(rng: random.Random, n: int, *, days: float = 120.0, end_ms: int | None = None) -> list[int]:
    """``n`` ascending creation times spread over the last ``days`` days."""
    end = end_ms if end_ms is not None else int(time.time() * 1000) - 60_000
    start = end - int(days * 86_400_000)
    return sorted(rng.randrange(start, end) for _ in range(n))
