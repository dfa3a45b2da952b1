"""Monitoring end to end: labdeck.log() in a job, zero-code capture, the agent (GPUs faked only at
the driver boundary), per-process GPU memory mapped to runs, idle flags, and the Monitor tab."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from backends.config import load_config
from backends.hostid import host_id
from backends.monitor import IDLE_UTIL, InstanceMonitor, stop_agent
from backends.paths import Paths
from backends.workstation import Workstation

from .test_ssh import make_ws, rig_config


async def follow_to_end(ws: Workstation, run_id: str, timeout: float = 60):
    return await asyncio.wait_for(ws.follower.follow(run_id), timeout)


async def test_labdeck_log_points_reach_the_series_on_a_node(home, fresh_rig, tmp_path) -> None:
    rig = fresh_rig
    ws = make_ws(home, rig)
    try:
        (tmp_path / "p").mkdir()
        (tmp_path / "p" / "train.py").write_text(
            "import labdeck, math\n"
            "labdeck.config({'lr': 0.001, 'layers': 4})\n"
            "for i in range(2000):\n"
            "    labdeck.log({'loss': 1.0 / (i + 1), 'acc': i / 2000}, step=i)\n"
            "labdeck.log({'loss': float('nan'), 'note': 'text'}, step=2000)\n"
            "print('val_loss=0.25 epoch=1')\n"
            "import os\nopen(os.path.join(os.environ['LABDECK_RUN_DIR'], 'ckpt.bin'), 'wb').write(b'w')\n")
        run = await ws.launch(f"{rig.python} train.py --seed 7", instance="node1", workdir=str(tmp_path / "p"))
        done = await follow_to_end(ws, run.id)
        assert done.state == "succeeded", done.state_reason
        # what the run recorded, for lineage
        assert done.params == {"seed": 7, "lr": 0.001, "layers": 4}
        assert done.metrics_summary["loss"]["min"] == pytest.approx(1 / 2000) and done.metrics_summary["loss"]["last"] == "NaN"
        assert done.environment["python"].startswith("3.") and done.artifacts == ["ckpt.bin"]
        assert done.instance_info["provider"] == "lab" and done.instance_info["vcpus"] > 0
        # a second run loads the first one's checkpoint: it becomes its child
        (tmp_path / "p" / "finetune.py").write_text(
            f"import labdeck\nprint(open(labdeck.use('{run.id}', 'ckpt.bin'), 'rb').read())\n")
        run2 = await ws.launch(f"{rig.python} finetune.py", instance="node1", workdir=str(tmp_path / "p"))
        done2 = await follow_to_end(ws, run2.id)
        assert done2.state == "succeeded" and done2.parent == run.id
        assert ws.follower.local_path(done2).read_text().strip() == "b'w'"
        assert [(e["parent"], e["kind"]) for e in ws.store.mine.all("edges") if e["child"] == run2.id] == [(run.id, "uses")]
        rm = ws.monitor.runs[run.id]
        loss, acc = rm.series.series("loss"), rm.series.series("acc")
        assert len(loss) == 2001 and len(acc) == 2000  # the NaN point is kept (a diverged loss shows)
        assert rm.series.summary()["loss"]["min"] == pytest.approx(1 / 2000)
        assert rm.config == {"lr": 0.001, "layers": 4}
        assert math.isnan(rm.series.summary()["loss"]["last"])
        assert rm.series.series("val_loss").last == 0.25  # zero-code capture from the log
        assert rm.warnings["non-numeric value"] >= 1 or sum(rm.warnings.values()) >= 1
    finally:
        await ws.close()


async def test_agent_maps_gpu_memory_to_the_run_on_a_node(home, fresh_rig, tmp_path) -> None:
    rig = fresh_rig
    node = rig.host("node1")
    fake = node.home / "fake-gpus.json"
    (home / "config.toml").write_text(rig_config(rig) + f'[monitor]\ngpu_source = "fake:{fake}"\n')
    ws = Workstation(load_config(Paths.resolve(home)))
    t = None
    try:
        run = await ws.launch("sleep 60 & echo $! > gpu-pid; wait", instance="node1", workdir=str(node.home),
                              sync_code=False)
        t = await ws.transport("node1")
        for _ in range(50):
            pid = (await t.run(f"cat {node.home}/gpu-pid 2>/dev/null")).text().strip()
            if pid:
                break
            await asyncio.sleep(0.1)
        gpus = {"gpus": [{"index": 0, "name": "Fake H100", "util": 12, "mem_used": 30000, "mem_total": 81559,
                          "temp": 60, "power": 300.0}],
                "procs": [{"pid": int(pid), "gpu": 0, "mem": 29000}]}
        await t.put_files({str(fake): json.dumps(gpus).encode()})
        deadline = time.monotonic() + 20
        inst = ws.monitor.instance("node1")
        while time.monotonic() < deadline:
            await ws.monitor.poll_instance("node1")
            if inst.last.get("runs", {}).get(run.id, {}).get("gpu_mem"):
                break
            await asyncio.sleep(0.5)
        s = inst.last
        assert s["gpu_source"] == "fake" and s["gpus"][0]["name"] == "Fake H100"
        assert s["runs"][run.id]["gpu_mem"] == 29000 and s["runs"][run.id]["gpus"] == [0]
        assert [p["run"] for p in s["gpu_procs"]] == [run.id]
        assert inst.gpu_util[0].last == 12 and s["cpu"] >= 0 and s["mem_total"] > 0
        assert inst.run_gpu_mean(run.id) == 12
    finally:
        if t is not None:
            await stop_agent(t)
        await ws.close()


def test_idle_flag_needs_low_gpu_use_over_the_window(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    lines = []
    for i in range(200):  # 200 s: a busy run and an idle one
        lines.append(json.dumps({"t": 1000 + i, "cpu": 50, "mem_used": 1, "mem_total": 2,
                                 "gpus": [{"index": 0, "util": 95}, {"index": 1, "util": 8}],
                                 "runs": {"BUSY": {"gpus": [0]}, "IDLE": {"gpus": [1]}}}))
    path.write_text("\n".join(lines) + "\n{truncated")
    m = InstanceMonitor("n", path)
    assert m.ingest() == 200 and m.n == 200
    assert m.run_gpu_mean("BUSY") == 95 and m.run_gpu_mean("IDLE") == 8 < IDLE_UTIL
    from backends.monitor import Monitor

    mon = Monitor(None, tmp_path)
    mon.instances["n"] = m
    assert mon.idle_runs() == {"IDLE": 8.0}
    path.write_text(path.read_text() + "garbage}\n")  # the truncated line is completed by garbage
    m.ingest()
    assert m.warnings["invalid agent sample"] == 1


async def test_local_agent_and_top(workstation: Workstation, tmp_path: Path) -> None:
    t = await workstation.transport("local")
    try:
        n = 0
        for _ in range(30):
            n += await workstation.monitor.poll_instance("local")
            if n >= 2:
                break
            await asyncio.sleep(0.5)
        last = workstation.monitor.instance("local").last
        assert n >= 2 and last["gpu_source"] in ("none", "nvitop", "nvidia-smi") and last["ncpu"] > 0
        # the agent lives beside the runs directory, inside LABDECK_HOME, in this host's own directory
        hid, _ = await host_id(t)
        assert (Path(workstation.config.paths.data_dir) / "agent" / hid / "samples.jsonl").exists()
        assert last["host"] == hid
    finally:
        await stop_agent(t)


async def test_tensorboard_event_files_become_series(workstation: Workstation, tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX", reason="tensorboardX writes the real event files for this test")
    import sys

    code = ("from tensorboardX import SummaryWriter\n"
            "w = SummaryWriter('tb')\n"
            "for i in range(20):\n    w.add_scalar('tb/loss', 1.0 / (i + 1), i)\n"
            "    w.add_scalars('pair', {'train': float(i), 'val': 2.0 * i}, i)\n"
            "w.add_scalar('big', 1.0, 2**63 - 1)\n"
            "w.add_histogram('weights', [1.0, 2.0, 3.0], 0)\nw.close()\n")
    (tmp_path / "tbjob.py").write_text(code)
    run = await workstation.launch(f"{sys.executable} tbjob.py", workdir=str(tmp_path))
    done = await follow_to_end(workstation, run.id)
    assert done.state == "succeeded"
    s = workstation.monitor.runs[run.id].series.series("tb/loss")
    assert len(s) == 20 and s.last == pytest.approx(1 / 20, rel=1e-6)
    assert done.metrics_summary["tb/loss"]["min"] == pytest.approx(1 / 20, rel=1e-6)
    # add_scalars' keys are TensorBoard runs of their own (subdirectories): kept apart, not merged
    assert done.metrics_summary["pair/train/pair"]["count"] == 20 and done.metrics_summary["pair/train/pair"]["last"] == 19
    assert done.metrics_summary["pair/val/pair"]["count"] == 20 and done.metrics_summary["pair/val/pair"]["last"] == 38
    stored = workstation.store.own_run(run.id).metrics_summary  # through the store: the step exact
    assert stored["big"]["last_step"] == 2**63 - 1


async def test_gpu_host_without_nvitop_bootstraps_a_venv_or_carries_on(workstation: Workstation, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """nvidia-smi present, nvitop missing: labdeck tries a private venv once; with no package index
    reachable that fails quietly and the agent runs on with the system Python."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")  # the driver tool, faked at the boundary
    (fake_bin / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens: pip fails at once
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    t = await workstation.transport("local")
    d = Path(workstation.config.paths.data_dir) / "agent" / (await host_id(t))[0]
    try:
        from backends.monitor import ensure_agent

        system_python = "/usr/bin/python3"  # a Python without nvitop (this interpreter has it)
        if not os.path.exists(system_python) or subprocess.run([system_python, "-c", "import nvitop"]).returncode == 0:
            pytest.skip("needs a Python without nvitop at /usr/bin/python3")
        await ensure_agent(t, python=system_python)
        assert (d / "bootstrap.tried").exists()
        deadline = time.monotonic() + 60
        log = ""
        while time.monotonic() < deadline:
            log = (d / "bootstrap.log").read_text() if (d / "bootstrap.log").exists() else ""
            if "ERROR" in log or "error" in log.lower():
                break
            await asyncio.sleep(0.5)
        assert "error" in log.lower()
        assert (d / "python").read_text().strip() == system_python  # still the system Python
        await ensure_agent(t, python=system_python)  # tried within the day: not again
        assert (d / "bootstrap.tried").stat().st_mtime <= time.time()
        n = 0
        for _ in range(20):
            n += await workstation.monitor.poll_instance("local")
            if n:
                break
            await asyncio.sleep(0.5)
        assert n >= 1
    finally:
        await stop_agent(t)


def test_one_update_reads_a_whole_local_copy_and_the_poll_loop_takes_slices(tmp_path: Path) -> None:
    """``update()`` (lineage curves, Compare, report) reads a copy of any size at once; only the follow
    loop asks for UPDATE_SLICE bytes at a time (and sees ``backlog``)."""
    from backends.models import Run
    from backends.monitor import UPDATE_SLICE, RunMonitor

    n = 40_000
    lines = "".join(json.dumps({"t": 1000.0 + i, "s": i, "m": {"loss": 1.0 / (i + 1)}}) + "\n" for i in range(n))
    assert len(lines) > 2 * UPDATE_SLICE
    (tmp_path / "m.jsonl").write_text(lines)
    run = Run(command="x", instance="local")
    whole = RunMonitor(run, tmp_path / "m.jsonl", tmp_path / "none.log")
    whole.update()
    assert len(whole.series.series("loss")) == n and not whole.backlog
    sliced = RunMonitor(run, tmp_path / "m.jsonl", tmp_path / "none.log")
    sliced.update(UPDATE_SLICE)
    assert sliced.backlog and 0 < len(sliced.series.series("loss")) < n
    while sliced.backlog:
        sliced.update(UPDATE_SLICE)
    assert len(sliced.series.series("loss")) == n
