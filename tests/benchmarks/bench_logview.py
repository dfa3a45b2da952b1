"""Log viewer on a 1 GiB log: first paint of the tail, full index, search, follow latency, memory.

One 1 GiB file of realistic training-log lines (~110 bytes each, about 9.5 million
lines) is written to a scratch directory and removed afterwards. Two needles are
planted: one about 100 KB from the start, one about 99 % of the way in.

The viewer runs in-process, headless at 160×48: a bare Textual App pushes
``LogScreen(run_ref, title, path=FILE)`` (tui.logview.LogView inside) and the
benchmark polls the view every millisecond. Marks, from ``push_screen``:

* first paint — the first line of text rendered (``LogView.first_paint``: the
  end of the file, from the tail index);
* full index — every line indexed (absolute line numbers);
* search, hit near the start — from the end of the file (where the view opens),
  wrapping round to the needle near the start; then the background count for
  "match i of M" (a whole pass over the file);
* search, hit near the end — from the top, so almost the whole file is scanned;
* search, miss — the whole file scanned;
* follow — a line appended to the file until the view shows it (4 polls a second);
* RSS growth — the process's resident memory after the index, and its peak
  while indexing and searching, over the RSS before the screen was pushed.

The whole sequence runs twice: "cold" (after fsync and ``posix_fadvise(DONTNEED)``,
so the index has to read the file from the disk; a VM's host may still cache it;
the searches that follow find it cached again) and "warm" (all from the page cache).
Baselines in the same run: a plain sequential read + ``bytes.count`` of the
whole file (the floor of any newline index in Python) and ``grep -c -i -F`` for
the missing text.

Targets: first paint ≤ 0.5 s, full index ≤ 5 s, a miss ≤ 5 s, RSS growth ≤ 100 MB (warm).

Run: ``python3 -m tests.benchmarks logview`` (or ``python3 -m tests.benchmarks.bench_logview``).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from ._common import Verdict, console, filesystem_of, finish, fmt_ms, new_table, scratch_dir, verdict

NAME = "logview"
SIZE_BYTES = 1 << 30
QUICK_BYTES = 64 << 20
NEEDLE_START = b"NEEDLE-start-7f3a9c"
NEEDLE_END = b"NEEDLE-end-2b81d4"
MISSING = "no-such-text-0x5eed"
TARGET_FIRST_PAINT_S = 0.5
TARGET_INDEX_S = 5.0
TARGET_MISS_S = 5.0
TARGET_RSS_MB = 100.0
GIVE_UP_S = 120.0
SCREEN = (160, 48)


def make_log(path: Path, size: int) -> dict[str, Any]:
    """``size`` bytes of training-log lines in repeated 4 MB blocks, with the two needles planted."""
    rng = random.Random(20240502)
    lines = []
    for i in range(38_000):
        lines.append(f"2024-05-01T12:{i // 600 % 60:02d}:{i // 10 % 60:02d}.{i % 1000:03d}Z INFO train "
                     f"epoch {i % 90 + 1}/90 step {i * 17} loss {rng.uniform(0.05, 4):.4f} acc {rng.uniform(0.1, 0.99):.3f} "
                     f"lr {10 ** rng.uniform(-5, -2):.2e} {rng.randrange(50, 900)} samples/s\n")
    block = "".join(lines).encode()
    start_at, end_at = 100_000, int(size * 0.99)
    t = time.perf_counter()
    written, planted = 0, {}
    with open(path, "wb") as f:
        while written < size:
            chunk = block if size - written >= len(block) else block[: block.rfind(b"\n", 0, size - written) + 1]
            if not chunk:  # less than a line left
                break
            for name, needle, at in (("start", NEEDLE_START, start_at), ("end", NEEDLE_END, end_at)):
                if name not in planted and written <= at < written + len(chunk):
                    cut = chunk.index(b"\n", at - written) + 1  # after a whole line
                    chunk = chunk[:cut] + b"here is the " + needle + b" you want\n" + chunk[cut:]
                    planted[name] = written + cut
            f.write(chunk)
            written += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": written, "lines_approx": written // (len(block) // len(lines)), "write_s": time.perf_counter() - t,
            "needle_offsets": planted}


def drop_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's pages (no root needed); False where that is not available."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def baseline_count(path: Path, chunk: int = 4 << 20) -> tuple[float, int]:
    """Read the whole file sequentially and count newlines: the floor for indexing it in Python."""
    t = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while (got := f.readinto(buf)):
            n += buf.count(b"\n", 0, got) if got == chunk else bytes(view[:got]).count(b"\n")
    return time.perf_counter() - t, n


def baseline_grep(path: Path) -> float | None:
    grep = shutil.which("grep")
    if grep is None:
        return None
    t = time.perf_counter()
    subprocess.run([grep, "-c", "-i", "-F", MISSING, str(path)], capture_output=True, timeout=GIVE_UP_S)
    return time.perf_counter() - t


async def measure_view(path: Path) -> dict[str, Any]:
    """Open the log screen on ``path`` in a headless app and time what a user waits for."""
    from textual.app import App

    from tui.logview import LogView
    from tui.widgets import LogScreen

    proc = psutil.Process()
    out: dict[str, Any] = {}
    peak = [0]

    async def until(cond: Callable[[], bool], what: str) -> float:
        t = time.perf_counter()
        while not cond():
            peak[0] = max(peak[0], proc.memory_info().rss)
            if time.perf_counter() - t > GIVE_UP_S:
                raise TimeoutError(f"gave up waiting for {what}")
            await asyncio.sleep(0.001)
        return time.perf_counter()

    app = App()
    async with app.run_test(size=SCREEN) as pilot:
        await pilot.pause()
        rss0 = proc.memory_info().rss
        peak[0] = rss0
        t0 = time.perf_counter()
        screen = LogScreen(run_ref="bench", title="bench", path=path)
        app.push_screen(screen)
        await until(lambda: screen.is_mounted and screen.query(LogView) and screen.query_one(LogView).first_paint,
                    "the first paint")
        view = screen.query_one(LogView)
        out["first_paint_s"] = view.first_paint - t0
        out["tail_lines"] = view.line_count
        out["full_index_s"] = await until(lambda: view.indexed, "the full index") - t0
        out["lines"] = view.line_count
        await pilot.pause(0.05)
        out["rss_after_index_mb"] = (proc.memory_info().rss - rss0) / 1e6

        # hit near the start, from the end (where the view opened): wraps round
        t = time.perf_counter()
        view.search(NEEDLE_START.decode())
        t_found = await until(lambda: view.search_state in ("found", "not found"), "the start needle")
        out["search_hit_start_s"] = t_found - t
        out["search_hit_start_line"] = view.match_line
        out["search_hit_start_ok"] = view.search_state == "found" and NEEDLE_START.decode() in view.get_line(view.match_line)
        out["search_count_s"] = await until(lambda: view.match_total is not None, "the match count") - t
        out["search_count"] = f"{view.match_ordinal} of {view.match_total}"

        # hit near the end, from the top
        view.scroll_to_top()
        await pilot.pause()
        t = time.perf_counter()
        view.search(NEEDLE_END.decode())
        t_found = await until(lambda: view.search_state in ("found", "not found"), "the end needle")
        out["search_hit_end_s"] = t_found - t
        out["search_hit_end_ok"] = view.search_state == "found" and NEEDLE_END.decode() in view.get_line(view.match_line)

        # a miss: the whole file
        t = time.perf_counter()
        view.search(MISSING)
        t_found = await until(lambda: view.search_state in ("found", "not found"), "the miss")
        out["search_miss_s"] = t_found - t
        out["search_miss_ok"] = view.search_state == "not found"

        # follow: append a line, wait for it
        view.scroll_to_end()
        await pilot.pause()
        before = view.line_count
        t = time.perf_counter()
        with open(path, "ab") as f:
            f.write(b"one more line\n")
        out["follow_s"] = await until(lambda: view.line_count > before and view.scroll_y == view.max_scroll_y,
                                      "the appended line") - t
        out["rss_peak_mb"] = (peak[0] - rss0) / 1e6
        out["rss_end_mb"] = (proc.memory_info().rss - rss0) / 1e6
        out["status"] = view.status.plain
        await pilot.press("escape")
    return out


def main(quick: bool = False) -> list[Verdict]:
    size = QUICK_BYTES if quick else SIZE_BYTES
    t_all = time.perf_counter()
    results: dict[str, Any] = {}
    with scratch_dir("logview") as root:
        path = root / "train.log"
        console.print(f"[dim]logview: writing {size / (1 << 30):.2f} GiB to {path} …[/]")
        made = make_log(path, size)
        fs = filesystem_of(root)
        for mode in ("cold", "warm"):
            dropped = drop_cache(path) if mode == "cold" else None
            console.print(f"[dim]logview: {mode} run …[/]")
            results[mode] = asyncio.run(measure_view(path))
            results[mode]["cache_dropped"] = dropped
            with open(path, "r+b") as f:  # take the appended line off again
                f.truncate(made["bytes"])
        drop_cache(path)
        count_cold_s, newlines = baseline_count(path)
        count_warm_s, _ = baseline_count(path)
        grep_s = baseline_grep(path)
    elapsed = time.perf_counter() - t_all

    def ms(v: float | None) -> str:
        return fmt_ms(v * 1000) if v is not None else "—"

    table = new_table(
        f"Log viewer on {made['bytes'] / (1 << 30):.2f} GiB ({newlines:,} lines; headless {SCREEN[0]}×{SCREEN[1]}; ms)",
        ["Measure", ("cold", "right"), ("warm", "right"), "Baseline (same run)", "Target", "Met"])
    cold, warm = results["cold"], results["warm"]
    verdicts: list[Verdict] = []

    def row(label: str, key: str, baseline: str = "", target: float | None = None, unit: str = "s") -> None:
        met = None
        if target is not None and not quick:
            met = warm[key] <= target and cold[key] <= target
            shown = f"{warm[key] * 1000:,.0f} ms warm / {cold[key] * 1000:,.0f} ms cold" if unit == "s" else \
                f"{warm[key]:.1f} MB"
            verdicts.append(Verdict(NAME, f"{label} (1 GiB)", shown, f"≤ {target:g} {unit}", met))
        if unit == "s":
            table.add_row(label, ms(cold[key]), ms(warm[key]), baseline, f"≤ {target:g} s" if target else "", verdict(met))
        else:
            table.add_row(label, f"{cold[key]:.1f} MB", f"{warm[key]:.1f} MB", baseline,
                          f"≤ {target:g} MB" if target else "", verdict(met))

    row("first paint (the tail)", "first_paint_s", target=TARGET_FIRST_PAINT_S)
    row("full index", "full_index_s", f"read + count newlines: {ms(count_cold_s)} cold, {ms(count_warm_s)} warm",
        TARGET_INDEX_S)
    row("search: hit near the start (from the end, wraps)", "search_hit_start_s")
    row("search: … its match count (whole file)", "search_count_s")
    row("search: hit near the end (from the top)", "search_hit_end_s")
    row("search: miss (whole file)", "search_miss_s", f"grep -c -i -F: {ms(grep_s)} warm", TARGET_MISS_S)
    row("follow: appended line shown", "follow_s", "poll interval 250 ms")
    # memory: the warm run's numbers carry the target (the cold run is the first in the process)
    met = None if quick else warm["rss_peak_mb"] <= TARGET_RSS_MB
    if not quick:
        verdicts.append(Verdict(NAME, "RSS growth, peak (1 GiB)", f"{warm['rss_peak_mb']:.1f} MB", f"≤ {TARGET_RSS_MB:g} MB", met))
    table.add_row("RSS growth after the index", f"{cold['rss_after_index_mb']:.1f} MB", f"{warm['rss_after_index_mb']:.1f} MB",
                  "", "", "")
    table.add_row("RSS growth, peak", f"{cold['rss_peak_mb']:.1f} MB", f"{warm['rss_peak_mb']:.1f} MB",
                  f"one int per line would be {newlines * 8 / 1e6:,.0f} MB (array) / {newlines * 36 / 1e6:,.0f} MB (list)",
                  f"≤ {TARGET_RSS_MB:g} MB", verdict(met))
    console.print(table)
    ok = all(r[k] for r in results.values() for k in ("search_hit_start_ok", "search_hit_end_ok", "search_miss_ok"))
    console.print(f"[dim]file written in {made['write_s']:.1f} s on {fs}; tail index showed the last "
                  f"{warm['tail_lines']:,} lines first; searches {'all right' if ok else '[red]WRONG[/]'}; "
                  f"cache drop {'worked' if cold['cache_dropped'] else 'not available'}; took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "LogScreen/LogView on a big local log, headless, in-process",
        "params": {"bytes": made["bytes"], "newlines": newlines, "needle_offsets": made["needle_offsets"],
                   "screen": list(SCREEN), "filesystem": fs, "python": sys.version.split()[0]},
        "targets": {"first_paint_s": TARGET_FIRST_PAINT_S, "full_index_s": TARGET_INDEX_S,
                    "search_miss_s": TARGET_MISS_S, "rss_growth_mb": TARGET_RSS_MB},
        "baselines": {"read_count_cold_s": count_cold_s, "read_count_warm_s": count_warm_s, "grep_miss_warm_s": grep_s},
        "results": results,
        "searches_correct": ok,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
