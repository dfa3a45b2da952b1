"""Every benchmark's ``--quick`` mode, as a smoke test: a benchmark that no longer runs fails the suite.

The numbers are not checked (benchmarks are reports, not timed assertions); what is checked is that
each one runs to its end, prints its table and writes its JSON (``results/<name>-quick.json``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.__main__ import discover
from tests.benchmarks._common import RESULTS_DIR

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", discover())
def test_benchmark_quick(name: str, tmp_path: Path) -> None:
    result = RESULTS_DIR / f"{name}-quick.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "COLUMNS": "160"}
    env.pop("LABDECK_HOME", None)
    res = subprocess.run([sys.executable, "-m", "tests.benchmarks", name, "--quick"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "crashed" not in out, out[-6000:]
    doc = json.loads(result.read_text())
    assert doc["benchmark"] == name and "elapsed_s" in doc, doc.keys()
