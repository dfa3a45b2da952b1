"""Media: the cost of logging a 64×64 RGB image, and of stepping through images in the Media view.

1. ``labdeck.log({"img": labdeck.Image(array)}, step=i)`` per call, in a fresh child process
   (``PYTHONPATH=backends/runtime``, as in a job), beside tensorboardX's
   ``SummaryWriter.add_image("img", array, i, dataformats="HWC")`` measured in the same child and
   ``labdeck.log({"loss": x}, step=i)`` (a scalar: the floor). Each call is timed with
   ``perf_counter_ns``; a 1 ms sleep between calls stands for the training step (the writer
   thread encodes the PNG then, as it would in training). After the loop the child flushes and
   checks that every image was written (index lines and files).
2. The Media view (``tui/mediaview.py``, headless, 120×36) over a run of 30 such images read
   over the local transport: the time of a step change (``→``, until the worker is done and the
   screen has refreshed) for an image already seen (cached: the target), and for one seen for the
   first time (fetched and decoded), for scale.

Targets: ``log()`` of a 64×64 image median ≤ 50 µs; a step change to a cached image ≤ 50 ms.

Run: ``python3 -m tests.benchmarks media`` (``--quick``: fewer calls and steps).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ._common import REPO_ROOT, Verdict, console, finish, fmt_ms, new_table, percentile, scratch_dir, verdict

NAME = "media"
RUNTIME_DIR = REPO_ROOT / "backends" / "runtime"
TARGET_LOG_US = 50.0
TARGET_STEP_MS = 50.0
CALLS, QUICK_CALLS = 1000, 60
STEPS, QUICK_STEPS = 30, 8

CHILD = r'''
import json, os, sys, time
import numpy as np
import labdeck

N, OUT = int(sys.argv[1]), sys.argv[2]
labdeck.MEDIA_MAX_PER_KEY = N + 10  # no thinning: every image must be on disk at the end
rng = np.random.default_rng(0)
imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
pc = time.perf_counter_ns


def timed(fn):
    out = []
    for i in range(N):
        a = imgs[i % 8]
        t0 = pc()
        fn(i, a)
        out.append(pc() - t0)
        time.sleep(0.001)  # the training step
    return out


res = {}
res["scalar"] = timed(lambda i, a: labdeck.log({"loss": 0.5}, step=i))
res["labdeck"] = timed(lambda i, a: labdeck.log({"img": labdeck.Image(a)}, step=i))
ok = labdeck.flush(60)
try:
    from tensorboardX import SummaryWriter
    w = SummaryWriter(os.path.join(OUT, "tb"))
    res["tensorboardX"] = timed(lambda i, a: w.add_image("img", a, i, dataformats="HWC"))
    w.close()
except ImportError:
    res["tensorboardX"] = None
index = [json.loads(x) for x in open(os.path.join(os.environ["LABDECK_RUN_DIR"], "media", "index.jsonl"))]
files = os.listdir(os.path.join(os.environ["LABDECK_RUN_DIR"], "media", "img"))
res["check"] = {"flushed": ok, "index_lines": len(index), "files": len(files), "dropped": labdeck.media_dropped}
print(json.dumps(res))
'''

VIEW_JOB = r'''
import sys
import numpy as np
import labdeck
rng = np.random.default_rng(1)
for s in range(int(sys.argv[1])):
    labdeck.log({"img": labdeck.Image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))}, step=s)
labdeck.flush()
'''


def child_env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}
    env.update({"PYTHONPATH": str(RUNTIME_DIR), "LABDECK_RUN_DIR": str(run_dir),
                "LABDECK_METRICS_FILE": str(run_dir / "metrics.jsonl"), "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def measure_log(root: Path, calls: int) -> dict:
    run_dir = root / "logrun"
    run_dir.mkdir()
    res = subprocess.run([sys.executable, "-c", CHILD, str(calls), str(root)], env=child_env(run_dir),
                         capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"the child failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


async def measure_view(root: Path, steps: int) -> dict:
    from textual.app import App

    from backends.models import Run
    from backends.providers.local import LocalTransport
    from tui.mediaview import MediaScreen, MediaSource

    rid = "01HX00000000000000000000AA"
    run_dir = root / "runs" / rid
    run_dir.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", VIEW_JOB, str(steps)], env=child_env(run_dir), check=True, timeout=300)
    run = Run(command="x", instance="local", id=rid, name="bench", user=getpass.getuser(), state="succeeded",
              run_dir=str(run_dir))

    class ViewApp(App):
        def on_mount(self) -> None:
            src = MediaSource(run, transport=LocalTransport(root / "runs"), cache_root=root / "cache", tb_files=[])
            self.push_screen(MediaScreen(run, sources=(src,)))

    async def step(pilot, key: str) -> float:
        t0 = time.perf_counter()
        await pilot.press(key)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        return time.perf_counter() - t0

    first: list[float] = []
    cached: list[float] = []
    noop: list[float] = []
    app = ViewApp()
    async with app.run_test(size=(120, 36)) as pilot:
        for _ in range(3):
            await app.workers.wait_for_complete()
            await pilot.pause()
        await pilot.press("home")  # the first step: the rest are new
        await app.workers.wait_for_complete()
        await pilot.pause()
        for _ in range(steps - 1):
            first.append(await step(pilot, "right"))
        for _ in range(3):  # back and forth over what was seen: cached
            for _ in range(steps - 1):
                cached.append(await step(pilot, "left"))
                noop.append(await step(pilot, "z"))  # an unbound key: the pilot's and the loop's own cost
            for _ in range(steps - 1):
                cached.append(await step(pilot, "right"))
        shown = str(app.screen.query_one("#media-status").render())
    return {"first_s": first, "cached_s": cached, "noop_s": noop, "status": shown}


def main(quick: bool = False) -> list[Verdict]:
    calls = QUICK_CALLS if quick else CALLS
    steps = QUICK_STEPS if quick else STEPS
    t_all = time.perf_counter()
    with scratch_dir("media") as root:
        log = measure_log(root, calls)
        view = asyncio.run(measure_view(root, steps))
    elapsed = time.perf_counter() - t_all

    def us(samples):
        return None if samples is None else percentile([x / 1000 for x in samples], 50)

    def us99(samples):
        return None if samples is None else percentile([x / 1000 for x in samples], 99)

    lab, tbx, sc = us(log["labdeck"]), us(log["tensorboardX"]), us(log["scalar"])
    chk = log["check"]
    complete = chk["flushed"] and chk["index_lines"] == calls and chk["files"] == calls and not chk["dropped"]
    met_log = lab <= TARGET_LOG_US and complete
    t = new_table(f"log() of a 64×64 RGB image, {calls} calls a kind, 1 ms between calls "
                  f"(target: labdeck median ≤ {TARGET_LOG_US:g} µs)",
                  ["Call", ("median µs", "right"), ("p99 µs", "right"), "Note"])
    t.add_row("labdeck.log({'loss': x}) (a scalar: the floor)", f"{sc:.1f}", f"{us99(log['scalar']):.1f}", "")
    t.add_row("labdeck.log({'img': labdeck.Image(a)})", f"{lab:.1f}", f"{us99(log['labdeck']):.1f}",
              f"{chk['files']}/{calls} images on disk {verdict(met_log)}")
    if tbx is not None:
        t.add_row("tensorboardX add_image (encodes in the call)", f"{tbx:.1f}", f"{us99(log['tensorboardX']):.1f}",
                  f"labdeck {tbx / lab:.0f}× cheaper")
    else:
        t.add_row("tensorboardX add_image", "—", "—", "tensorboardX is not installed")
    console.print(t)
    raw_ms = percentile([x * 1000 for x in view["cached_s"]], 50)
    first_raw = percentile([x * 1000 for x in view["first_s"]], 50)
    noop_ms = percentile([x * 1000 for x in view["noop_s"]], 50)
    cached_ms = max(0.0, raw_ms - noop_ms)  # the step change's own cost: its key press less an unbound one's
    first_ms = max(0.0, first_raw - noop_ms)
    met_view = cached_ms <= TARGET_STEP_MS
    t2 = new_table(f"Media view step change, 64×64 images, 120×36, key press until repainted "
                   f"(target: cached ≤ {TARGET_STEP_MS:g} ms, net of an unbound key's press)",
                   ["Key press", ("n", "right"), ("median ms", "right"), ("p99 ms", "right"), ("net ms", "right"),
                    "Target"])
    t2.add_row("→/← to an image seen before (cached)", str(len(view["cached_s"])), fmt_ms(raw_ms),
               fmt_ms(percentile([x * 1000 for x in view["cached_s"]], 99)), fmt_ms(cached_ms), verdict(met_view))
    t2.add_row("→ to an image not seen yet (fetched, decoded)", str(len(view["first_s"])), fmt_ms(first_raw),
               fmt_ms(percentile([x * 1000 for x in view["first_s"]], 99)), fmt_ms(first_ms), "")
    t2.add_row("an unbound key (the pilot's own cost: the baseline)", str(len(view["noop_s"])), fmt_ms(noop_ms),
               fmt_ms(percentile([x * 1000 for x in view["noop_s"]], 99)), "", "")
    console.print(t2)
    verdicts = [Verdict(NAME, "log() of a 64×64 image, median", f"{lab:.1f} µs", f"≤ {TARGET_LOG_US:g} µs", met_log),
                Verdict(NAME, "Media view step change, cached image", f"{cached_ms:.1f} ms", f"≤ {TARGET_STEP_MS:g} ms",
                        met_view)]
    payload = {"calls": calls, "log_median_us": {"labdeck": lab, "tensorboardX": tbx, "scalar": sc},
               "log_check": chk, "log_samples_ns": {k: v for k, v in log.items() if k != "check"},
               "view": {"steps": steps, "cached_net_median_ms": cached_ms, "cached_raw_median_ms": raw_ms,
                        "first_net_median_ms": first_ms, "noop_median_ms": noop_ms, "cached_s": view["cached_s"],
                        "first_s": view["first_s"], "noop_s": view["noop_s"], "status": view["status"]}}
    return finish(NAME, payload, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
