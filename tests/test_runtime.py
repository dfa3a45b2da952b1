"""backends/runtime/labdeck.py, the module jobs import, in real processes.

Every test runs a script with ``python -c`` in a subprocess, with
``PYTHONPATH`` pointing at backends/runtime (as in a run directory's ``lib/``)
and ``LABDECK_METRICS_FILE`` at a temporary file, then reads that file back
with a strict JSON parser. Processes a test starts are killed by PID and reaped
at teardown.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "backends" / "runtime"
MODULE = RUNTIME / "labdeck.py"

# a writer period so long that only the exit/signal/explicit flushes can have written anything
SLOW_WRITER = "\n        import labdeck; labdeck.FLUSH_INTERVAL_S = 3600\n"  # (indented like the scripts)


def _strict(s: str):
    raise ValueError(f"non-standard JSON constant {s}")


def read_lines(path: Path) -> list[dict]:
    """Every line of a metrics file, parsed strictly (NaN/Infinity literals rejected)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "the file ends within a line"
    return [json.loads(line, parse_constant=_strict) for line in text.splitlines()]


def points(lines: list[dict]) -> list[tuple]:
    return [(d["s"], d["m"]) for d in lines if "m" in d]


@pytest.fixture
def metrics(tmp_path: Path) -> Path:
    return tmp_path / "run" / "metrics.jsonl"


@pytest.fixture
def env(tmp_path: Path, metrics: Path) -> dict[str, str]:
    metrics.parent.mkdir(parents=True, exist_ok=True)
    e = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}
    e.update({"PYTHONPATH": str(RUNTIME), "LABDECK_METRICS_FILE": str(metrics), "LABDECK_RUN_ID": "R0",
              "LABDECK_RUN_DIR": str(tmp_path / "runs" / "R0"), "PYTHONDONTWRITEBYTECODE": "1"})
    return e


@pytest.fixture
def spawn(tmp_path: Path, env: dict[str, str]):
    """Start ``python -c script``; every process is SIGKILLed (by PID) and reaped at teardown."""
    procs: list[subprocess.Popen] = []

    def _spawn(script: str, *, python: str = sys.executable, extra_env: dict[str, str] | None = None,
               drop_env: tuple[str, ...] = (), cwd: Path | None = None) -> subprocess.Popen:
        e = {**env, **(extra_env or {})}
        for k in drop_env:
            e.pop(k, None)
        p = subprocess.Popen([python, "-c", textwrap.dedent(script)], cwd=cwd or tmp_path, env=e,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=10)
        finally:
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


@pytest.fixture
def run(spawn):
    """Run a script to its end: (returncode, stdout, stderr)."""

    def _run(script: str, timeout: float = 60, **kw) -> tuple[int, str, str]:
        p = spawn(script, **kw)
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err

    return _run


def wait_for_line(p: subprocess.Popen, want: str, timeout: float = 20) -> list[str]:
    """Read ``p``'s stdout (raw, unbuffered) up to the line ``want``; return the lines before it."""
    deadline = time.monotonic() + timeout
    fd = p.stdout.fileno()
    data = b""
    while True:
        lines = data.decode().split("\n")
        if want in lines[:-1]:
            return lines[:lines.index(want)]
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out waiting for {want!r} (got {data!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"process exited ({p.wait()}) before {want!r}: {p.stderr.read()}")
            data += chunk


# ---- points, steps, values ----------------------------------------------------------
def test_points_arrive_with_steps_and_values(run, metrics: Path) -> None:
    rc, out, err = run("""
        import labdeck
        for i in range(5):
            labdeck.log({"loss": 1.0 / (i + 1), "acc": i * 0.1, "epoch": 1}, step=i * 10)
        print(labdeck.run_id())
    """)
    assert rc == 0, err
    assert out.strip() == "R0"
    assert err == ""
    lines = read_lines(metrics)
    assert points(lines) == [(i * 10, {"loss": 1.0 / (i + 1), "acc": i * 0.1, "epoch": 1}) for i in range(5)]
    assert all(isinstance(d["t"], float) and abs(d["t"] - time.time()) < 120 for d in lines)
    assert type(lines[0]["m"]["epoch"]) is int
    raw = metrics.read_text()
    assert '"s":0,"m":{"loss":1.0,"acc":0.0,"epoch":1}}' in raw and ": " not in raw  # compact separators


def test_auto_step_continues_from_the_last_explicit_step(run, metrics: Path) -> None:
    rc, _, err = run("""
        import labdeck
        labdeck.log({"a": 1})
        labdeck.log({"a": 2})
        labdeck.log({"a": 3}, step=100)
        labdeck.log({"a": 4})
        labdeck.log({"a": 5}, step=7)
        labdeck.log({"a": 6})
        labdeck.log({"a": 7}, step=2.5)
        labdeck.log({"a": 8})
    """)
    assert rc == 0, err
    assert [s for s, _ in points(read_lines(metrics))] == [0, 1, 100, 101, 7, 8, 2.5, 3.5]


def test_non_finite_floats_are_strings_and_every_line_is_strict_json(run, metrics: Path) -> None:
    rc, _, err = run("""
        import labdeck, math
        labdeck.log({"nan": float("nan"), "inf": math.inf, "ninf": -math.inf, "ok": 0.5}, step=1)
        labdeck.log({"big": 1e308 * 10, "small": 1e-320}, step=2)
        labdeck.log({"x": 1.0}, step=float("nan"))
        labdeck.config({"lr": float("nan"), "grid": [1.0, float("inf")]})
    """)
    assert rc == 0, err
    lines = read_lines(metrics)  # strict: would raise on a NaN literal
    assert lines[0]["m"] == {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "ok": 0.5}
    assert lines[1]["m"] == {"big": "Infinity", "small": 1e-320}
    assert lines[2]["s"] is None and lines[2]["m"] == {"x": 1.0}
    assert lines[3]["config"] == {"lr": "NaN", "grid": [1.0, "Infinity"]}


def test_non_numeric_values_are_converted_or_dropped_and_reported_once(run, metrics: Path) -> None:
    rc, out, err = run("""
        import labdeck, decimal, fractions

        class Scalar:  # like a numpy/torch scalar
            def __init__(self, v): self.v = v
            def item(self): return self.v

        class Tensor:  # like a tensor of many elements
            def item(self): raise ValueError("only one element tensors can be converted")

        labdeck.log({"loss": 0.5, "name": "resnet"}, step=0)
        labdeck.log({"flag": True, "off": False, "np": Scalar(2.5), "npint": Scalar(3), "npbool": Scalar(True)}, step=1)
        labdeck.log({"dec": decimal.Decimal("1.5"), "frac": fractions.Fraction(1, 4), "text": "0.25"}, step=2)
        labdeck.log({"none": None, "t": Tensor(), "lst": [1, 2], "z": 1j, "ok": 1}, step=3)
        labdeck.log({"only": "strings"}, step=4)
        print(labdeck.dropped, labdeck.flush(), labdeck.dropped)
    """)
    assert rc == 0, err
    lines = read_lines(metrics)
    assert points(lines) == [
        (0, {"loss": 0.5}),
        (1, {"flag": 1, "off": 0, "np": 2.5, "npint": 3, "npbool": 1}),
        (2, {"dec": 1.5, "frac": 0.25, "text": 0.25}),
        (3, {"ok": 1}),
    ]  # step 4 had nothing left: no line
    assert out.split() in (["0", "True", "6"], ["6", "True", "6"])  # the writer converts (within 0.1 s)
    assert err.count("labdeck: dropped") == 1, err
    assert "labdeck: dropped 6 non-numeric metric values (first: key=name, a str)" in err


def test_log_never_raises(run, metrics: Path) -> None:
    rc, out, err = run("""
        import labdeck, collections.abc, types
        class M(collections.abc.Mapping):  # a mapping without .copy()
            def __getitem__(self, k): return {"m": 1.0}[k]
            def __iter__(self): return iter(["m"])
            def __len__(self): return 1
        labdeck.log(None)
        labdeck.log(42)
        labdeck.log("loss")
        labdeck.log({"a": 1}, step="x")
        labdeck.log({"b": 2}, step=object())
        labdeck.log({(1, 2): 3.0, 5: 4.0}, step=10)
        labdeck.log(M(), step=11)
        labdeck.log(types.MappingProxyType({"p": 2}), step=12)
        labdeck.log([("pairs", 1.5)], step=13)
        print("alive")
    """)
    assert rc == 0, err
    assert out.strip() == "alive"
    pts = points(read_lines(metrics))
    assert pts[0] == (0, {"a": 1}) and pts[1] == (1, {"b": 2})  # unusable steps: the automatic one
    assert pts[2:] == [(10, {"(1, 2)": 3.0, "5": 4.0}), (11, {"m": 1.0}), (12, {"p": 2}), (13, {"pairs": 1.5})]
    assert "dropped 3 non-numeric" in err  # None, 42, "loss"


def test_the_logged_dict_is_copied(run, metrics: Path) -> None:
    rc, _, err = run(SLOW_WRITER + """
        m = {"loss": 1.0}
        labdeck.log(m)
        m["loss"] = 2.0
        m["new"] = 3.0
        labdeck.log(m)
    """)
    assert rc == 0, err
    assert points(read_lines(metrics)) == [(0, {"loss": 1.0}), (1, {"loss": 2.0, "new": 3.0})]


def test_threads_log_concurrently(run, metrics: Path) -> None:
    rc, _, err = run("""
        import labdeck, threading
        def work(k):
            for i in range(20000):
                labdeck.log({k: i}, step=i)
        ts = [threading.Thread(target=work, args=(f"w{j}",)) for j in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
    """)
    assert rc == 0, err
    pts = points(read_lines(metrics))
    assert len(pts) == 80000
    for j in range(4):
        mine = [s for s, m in pts if f"w{j}" in m]
        assert mine == list(range(20000))  # each thread's points complete and in order


def test_a_burst_beyond_the_high_water_mark_is_written_whole(run, metrics: Path) -> None:
    rc, _, err = run("""
        import labdeck
        for i in range(150000):
            labdeck.log({"loss": i * 0.5, "acc": 1.0})
    """)
    assert rc == 0, err
    pts = points(read_lines(metrics))
    assert [s for s, _ in pts] == list(range(150000))
    assert pts[-1][1] == {"loss": 149999 * 0.5, "acc": 1.0}


def test_the_writer_flushes_every_tenth_of_a_second(spawn, metrics: Path) -> None:
    p = spawn("""
        import labdeck, time
        labdeck.log({"a": 1})
        print("ready", flush=True)
        time.sleep(60)
    """)
    wait_for_line(p, "ready")
    deadline = time.monotonic() + 5
    while not read_lines(metrics) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert points(read_lines(metrics)) == [(0, {"a": 1})]


# ---- config, use ----------------------------------------------------------------------
def test_config_and_use_are_written_promptly(run, metrics: Path, tmp_path: Path) -> None:
    rc, out, err = run(SLOW_WRITER + """
        import json, os, pathlib, time
        path = os.environ["LABDECK_METRICS_FILE"]

        def seen(key):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if os.path.exists(path) and any(key in json.loads(l) for l in open(path)):
                    return True
                time.sleep(0.01)
            return False

        labdeck.config({"lr": 3e-4, "layers": [64, 64], "name": "x", "dir": pathlib.Path("/data"), "opt": {"b1": 0.9}})
        print(seen("config"))
        print(labdeck.use("01ABC", "ckpt/final.pt"))
        print(seen("use"))
        print(labdeck.use("01ABC", "/abs/model.bin"))
    """)
    assert rc == 0, err
    seen_config, used, seen_use, absolute = out.split("\n")[:4]
    assert seen_config == "True" and seen_use == "True"
    assert used == str(tmp_path / "runs" / "01ABC" / "ckpt" / "final.pt")
    assert absolute == "/abs/model.bin"
    lines = read_lines(metrics)
    assert lines[0]["config"] == {"lr": 3e-4, "layers": [64, 64], "name": "x", "dir": "/data", "opt": {"b1": 0.9}}
    assert lines[1]["use"] == {"run": "01ABC", "path": "ckpt/final.pt"}
    assert lines[2]["use"] == {"run": "01ABC", "path": "/abs/model.bin"}
    assert isinstance(lines[1]["t"], float)
    assert '{"t":' in metrics.read_text() and '"use":{"run":"01ABC","path":"ckpt/final.pt"}}' in metrics.read_text()


def test_lines_keep_the_order_of_the_calls(run, metrics: Path) -> None:
    rc, _, err = run("""
        import labdeck
        labdeck.log({"a": 1})
        labdeck.config({"p": 1})
        labdeck.log({"a": 2})
        labdeck.use("R9", "x")
        labdeck.log({"a": 3})
    """)
    assert rc == 0, err
    kinds = [next(k for k in ("m", "config", "use") if k in d) for d in read_lines(metrics)]
    assert kinds == ["m", "config", "m", "use", "m"]


# ---- exit and signals --------------------------------------------------------------------
def test_flush_on_normal_exit(run, metrics: Path) -> None:
    rc, _, err = run(SLOW_WRITER + """
        for i in range(1000):
            labdeck.log({"i": i})
    """)
    assert rc == 0, err
    assert [m["i"] for _, m in points(read_lines(metrics))] == list(range(1000))


def test_flush_on_sys_exit_and_uncaught_exception(run, metrics: Path) -> None:
    rc, _, err = run(SLOW_WRITER + """
        labdeck.log({"a": 1})
        raise RuntimeError("boom")
    """)
    assert rc == 1 and "RuntimeError: boom" in err
    assert points(read_lines(metrics)) == [(0, {"a": 1})]


def test_points_logged_by_later_atexit_hooks_are_written(run, metrics: Path) -> None:
    rc, _, err = run("""
        import atexit, labdeck
        atexit.register(lambda: labdeck.log({"final": 1.0}, step=99))  # runs after labdeck's own hook
        labdeck.log({"a": 1})
    """)
    assert rc == 0, err
    assert points(read_lines(metrics)) == [(0, {"a": 1}), (99, {"final": 1.0})]


@pytest.mark.parametrize("slow_writer", [True, False], ids=["signal-flushes", "default-writer"])
def test_flush_on_sigterm_and_the_process_still_dies_of_it(spawn, metrics: Path, slow_writer: bool) -> None:
    p = spawn((SLOW_WRITER if slow_writer else "\n        import labdeck\n") + """
        import time
        for i in range(500):
            labdeck.log({"i": i})
        print("ready", flush=True)
        time.sleep(60)
        print("not killed", flush=True)
    """)
    wait_for_line(p, "ready")
    if slow_writer:
        assert read_lines(metrics) == []  # nothing written yet: the signal's flush must write it all
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == -signal.SIGTERM, err
    assert "not killed" not in out
    assert [m["i"] for _, m in points(read_lines(metrics))] == list(range(500))


def test_sigterm_exit_status_through_a_shell_is_143(tmp_path: Path, env: dict[str, str], metrics: Path) -> None:
    script = textwrap.dedent(SLOW_WRITER) + "import time\nlabdeck.log({'a': 1})\nprint('ready', flush=True)\ntime.sleep(60)\n"
    p = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "$SCRIPT"; echo "rc=$?"'],
                         env={**env, "SCRIPT": script}, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(p, "ready")
        child = int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(child, signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
        assert out.strip().endswith("rc=143")
        assert points(read_lines(metrics)) == [(0, {"a": 1})]
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def test_sigint_flushes_and_raises_keyboard_interrupt(spawn, metrics: Path) -> None:
    p = spawn(SLOW_WRITER + """
        import time
        labdeck.log({"before": 1})
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("caught", flush=True)
            labdeck.log({"after": 2})
    """)
    wait_for_line(p, "ready")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert out.strip() == "caught"
    assert points(read_lines(metrics)) == [(0, {"before": 1}), (1, {"after": 2})]


def test_uncaught_keyboard_interrupt_still_ends_the_process_as_before(spawn, metrics: Path) -> None:
    p = spawn(SLOW_WRITER + """
        import time
        labdeck.log({"before": 1})
        print("ready", flush=True)
        time.sleep(60)
    """)
    wait_for_line(p, "ready")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == -signal.SIGINT  # Python re-raises SIGINT at exit after an uncaught KeyboardInterrupt
    assert "KeyboardInterrupt" in err
    assert points(read_lines(metrics)) == [(0, {"before": 1})]


def test_sighup_flushes_and_kills(spawn, metrics: Path) -> None:
    p = spawn(SLOW_WRITER + """
        import time
        labdeck.log({"a": 1})
        print("ready", flush=True)
        time.sleep(60)
    """)
    wait_for_line(p, "ready")
    p.send_signal(signal.SIGHUP)
    p.communicate(timeout=20)
    assert p.returncode == -signal.SIGHUP
    assert points(read_lines(metrics)) == [(0, {"a": 1})]


def test_handlers_the_user_installed_are_not_replaced(spawn, metrics: Path) -> None:
    p = spawn(SLOW_WRITER + """
        import signal, sys, time

        def mine(signum, frame):
            print("user handler", flush=True)
            sys.exit(3)

        signal.signal(signal.SIGTERM, mine)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
        labdeck.log({"a": 1})
        print(signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,
              signal.getsignal(signal.SIGINT) is not signal.default_int_handler, flush=True)
        print("ready", flush=True)
        time.sleep(60)
    """)
    assert wait_for_line(p, "ready") == ["True True True"]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert out.strip() == "user handler"
    assert p.returncode == 3, err
    assert points(read_lines(metrics)) == [(0, {"a": 1})]  # flushed at exit (sys.exit runs atexit)


def test_handlers_are_installed_lazily_and_only_from_the_main_thread(run) -> None:
    rc, out, err = run("""
        import signal, threading
        import labdeck
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)   # import alone changes nothing
        t = threading.Thread(target=labdeck.log, args=({"a": 1},)); t.start(); t.join()
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)   # first log from a thread: not yet
        labdeck.config({"p": 1})
        print(signal.getsignal(signal.SIGTERM) is labdeck._on_signal)  # from the main thread: now
    """)
    assert rc == 0, err
    assert out.split() == ["True", "True", "True"]


# ---- I/O errors -------------------------------------------------------------------------
def test_directory_removed_mid_run_loses_points_not_the_training(run, metrics: Path) -> None:
    rc, out, err = run("""
        import labdeck, os, shutil
        d = os.path.dirname(os.environ["LABDECK_METRICS_FILE"])
        for i in range(3):
            labdeck.log({"i": i})
        labdeck.flush()
        shutil.rmtree(d)                       # the run directory is gone (labdeck cleaned it up)
        for i in range(3, 8):
            labdeck.log({"i": i})
        print(labdeck.flush(), labdeck.lost, flush=True)
        for i in range(8, 12):
            labdeck.log({"i": i})
        labdeck.flush()
        os.makedirs(d)                          # back: the next flush writes again
        for i in range(12, 14):
            labdeck.log({"i": i})
        print("trained to the end")
    """)
    assert rc == 0, err
    assert out.split("\n")[:2] == ["False 5", "trained to the end"]
    assert [m["i"] for _, m in points(read_lines(metrics))] == [12, 13]
    assert err.count("cannot write to") == 1, err  # reported once, not once per flush
    assert "No such file or directory" in err and "lost so far" in err
    assert "labdeck: 9 metric point(s) could not be written" in err


def test_disk_full_loses_points_not_the_training(run) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    rc, out, err = run("""
        import labdeck
        for i in range(1000):
            labdeck.log({"i": i})
        labdeck.flush()
        for i in range(10):
            labdeck.log({"i": i})
        print("done")
    """, extra_env={"LABDECK_METRICS_FILE": "/dev/full"})
    assert rc == 0, err
    assert out.strip() == "done"
    assert err.count("cannot write to /dev/full") == 1 and "No space left on device" in err
    assert "labdeck: 1010 metric point(s) could not be written" in err


def test_outside_labdeck_points_are_discarded_after_a_note(run, tmp_path: Path) -> None:
    rc, out, err = run("""
        import labdeck
        for i in range(1000):
            labdeck.log({"i": i})
        labdeck.config({"a": 1})
        print(labdeck.run_id(), labdeck.flush())
    """, drop_env=("LABDECK_METRICS_FILE", "LABDECK_RUN_ID"))
    assert rc == 0, err
    assert out.strip() == "None True"
    assert err.count("LABDECK_METRICS_FILE is not set") == 1
    assert not (tmp_path / "labdeck-metrics.jsonl").exists()


def test_outside_labdeck_with_fallback_points_go_to_the_working_directory(run, tmp_path: Path) -> None:
    cwd = tmp_path / "project"
    cwd.mkdir()
    rc, _, err = run("""
        import labdeck
        labdeck.log({"a": 1})
    """, drop_env=("LABDECK_METRICS_FILE",), extra_env={"LABDECK_METRICS_FALLBACK": "1"}, cwd=cwd)
    assert rc == 0, err
    assert err == ""
    assert points(read_lines(cwd / "labdeck-metrics.jsonl")) == [(0, {"a": 1})]


# ---- fork ----------------------------------------------------------------------------------
def test_a_forked_child_logs_to_the_same_file_without_the_parents_points(run, metrics: Path) -> None:
    rc, out, err = run(SLOW_WRITER + """
        import os, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process (3.12+)
        for i in range(100):
            labdeck.log({"parent": i})                   # still buffered when the child is forked
        pid = os.fork()
        if pid == 0:
            for i in range(50):
                labdeck.log({"child": i}, step=1000 + i)
            ok = labdeck.flush()                         # the child's own writer
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8)
        labdeck.log({"parent": 100})
    """)
    assert rc == 0, err
    assert out.strip() == "0"
    pts = points(read_lines(metrics))
    assert [m["parent"] for _, m in pts if "parent" in m] == list(range(101))  # none twice
    assert [(s, m["child"]) for s, m in pts if "child" in m] == [(1000 + i, i) for i in range(50)]


def test_multiprocessing_fork_workers_flush_when_they_end(run, metrics: Path) -> None:
    rc, _, err = run("""
        import multiprocessing as mp, warnings
        import labdeck
        warnings.simplefilter("ignore", DeprecationWarning)

        def worker(k):
            for i in range(200):
                labdeck.log({f"w{k}": i}, step=i)        # no flush: the worker ends with os._exit

        if __name__ == "__main__":
            labdeck.log({"main": 1})
            ctx = mp.get_context("fork")
            ps = [ctx.Process(target=worker, args=(k,)) for k in range(3)]
            for p in ps: p.start()
            for p in ps: p.join()
            assert all(p.exitcode == 0 for p in ps)
    """)
    assert rc == 0, err
    pts = points(read_lines(metrics))
    for k in range(3):
        assert [m[f"w{k}"] for _, m in pts if f"w{k}" in m] == list(range(200))
    assert sum("main" in m for _, m in pts) == 1


# ---- stdlib only, old and system interpreters ------------------------------------------------
def test_module_imports_only_the_standard_library() -> None:
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file is shipped on its own"
            names.add((node.module or "").split(".")[0])
    names.discard("__future__")
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def _interpreters() -> list[str]:
    found = []
    for cand in ["/usr/bin/python3", *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3")))]:
        if os.path.exists(cand) and cand not in found:
            found.append(cand)
    return found


SMOKE = """
    import sys, labdeck
    for i in range(3):
        labdeck.log({"loss": 1.0 / (i + 1), "bad": float("nan"), "s": "x"})
    labdeck.config({"python": sys.version.split()[0]})
    print(labdeck.use("R1", "a.bin"))
"""


@pytest.mark.parametrize("python", _interpreters() or [None])
def test_works_on_other_interpreters_with_the_stdlib_only(run, metrics: Path, tmp_path: Path, python: str | None) -> None:
    if python is None:
        pytest.skip("neither /usr/bin/python3 nor a Python 3.8 is installed")
    out = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 8))"], capture_output=True,
                         text=True).stdout.strip()
    if out != "True":
        pytest.skip(f"{python} is older than 3.8")
    # -S: no site-packages at all, so anything outside the standard library would fail to import
    res = subprocess.run([python, "-S", "-c", textwrap.dedent(SMOKE)], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(RUNTIME), "LABDECK_METRICS_FILE": str(metrics),
                              "LABDECK_RUN_DIR": str(tmp_path / "runs" / "R0"), "PATH": os.environ.get("PATH", "")})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "runs" / "R1" / "a.bin")
    lines = read_lines(metrics)
    assert [p for p in points(lines)] == [(i, {"loss": 1.0 / (i + 1), "bad": "NaN"}) for i in range(3)]
    assert "config" in lines[3] and lines[4]["use"] == {"run": "R1", "path": "a.bin"}
    assert "dropped 3 non-numeric" in res.stderr


def test_shipped_file_needs_nothing_else_from_the_package(tmp_path: Path, metrics: Path, env: dict[str, str]) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(MODULE, lib / "labdeck.py")  # as in a run directory
    res = subprocess.run([sys.executable, "-S", "-c", "import labdeck; labdeck.log({'a': 1}); print(labdeck.__file__)"],
                         env={**env, "PYTHONPATH": str(lib)}, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(lib / "labdeck.py")
    assert points(read_lines(metrics)) == [(0, {"a": 1})]
