"""A teammate's run whose run directory is a link to a directory of yours: labdeck never shows your
files as that run's log or metrics (the follower, the monitor and the log tail read with
``inside=RUN_DIR``: no link from the run directory down to the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends import jobs
from backends.errors import LabdeckError
from backends.models import Run
from backends.providers.local import LocalTransport

RID = "01HX0000000000000000000042"


def teammate_run(tmp_path: Path, *, link_dir: bool) -> tuple[Run, Path]:
    """bob's record names ``<tmp>/runs/RID`` as his run directory: a link to alice's own directory
    (``link_dir``) or a real directory whose ``output.log`` is a link to alice's file."""
    mine = tmp_path / "alice-private"
    mine.mkdir()
    (mine / "output.log").write_text("alice's secret line\n")
    (mine / "metrics.jsonl").write_text(json.dumps({"t": 1.0, "s": 1, "m": {"secret_metric": 42.0}}) + "\n")
    run_dir = tmp_path / "runs" / RID
    run_dir.parent.mkdir()
    if link_dir:
        run_dir.symlink_to(mine, target_is_directory=True)
    else:
        run_dir.mkdir()
        (run_dir / "output.log").symlink_to(mine / "output.log")
        (run_dir / "metrics.jsonl").symlink_to(mine / "metrics.jsonl")
    run = Run(command="python train.py", instance="local", id=RID, user="bob", state="succeeded",
              run_dir=str(run_dir))
    return run, mine


@pytest.mark.parametrize("link_dir", [True, False], ids=["run-dir-is-a-link", "output-log-is-a-link"])
async def test_a_teammates_linked_run_never_shows_your_files(workstation, tmp_path: Path, link_dir: bool) -> None:
    run, mine = teammate_run(tmp_path, link_dir=link_dir)
    t = LocalTransport(tmp_path / "runs")
    # the follower: the log is refused, nothing is copied into the cache
    with pytest.raises(LabdeckError, match="symbolic link"):
        await workstation.follower._mirror_log(run, t)
    copy = workstation.follower.local_path(run)
    assert not copy.exists() or b"secret" not in copy.read_bytes()
    # the log tail (labdeck logs, the Jobs tab's last lines)
    with pytest.raises(LabdeckError, match="symbolic link"):
        await jobs.read_log_tail(t, run)
    # the monitor: no metrics from it, no error
    assert await workstation.monitor.poll_run(run, t) == 0
    m = workstation.monitor.run(run)
    assert "secret_metric" not in m.series.names()
    assert not m.metrics_file.path.exists() or b"secret" not in m.metrics_file.path.read_bytes()


async def test_the_same_run_as_a_real_directory_is_read(workstation, tmp_path: Path) -> None:
    """The control: bob's run directory a real directory with real files reads as before."""
    run_dir = tmp_path / "runs" / RID
    run_dir.mkdir(parents=True)
    (run_dir / "output.log").write_text("bob's line\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"t": 1.0, "s": 1, "m": {"acc": 0.5}}) + "\n")
    run = Run(command="python train.py", instance="local", id=RID, user="bob", state="succeeded",
              run_dir=str(run_dir))
    t = LocalTransport(tmp_path / "runs")
    assert await workstation.follower._mirror_log(run, t) == len("bob's line\n")
    assert await jobs.read_log_tail(t, run) == "bob's line\n"
    assert await workstation.monitor.poll_run(run, t) >= 1
    assert "acc" in workstation.monitor.run(run).series.names()
