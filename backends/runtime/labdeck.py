"""labdeck's in-job API: log metrics, record parameters, declare the artifacts a run uses.

Inside a job that labdeck launched, ``import labdeck`` finds this file (it is
copied into the run directory's ``lib/``, which is on ``PYTHONPATH``)::

    import labdeck

    labdeck.config({"lr": 3e-4, "batch_size": 64})
    ckpt = labdeck.use("01J9Z3…", "ckpt/final.pt")   # -> <runs root>/01J9Z3…/ckpt/final.pt
    for step, batch in enumerate(loader):
        ...
        labdeck.log({"loss": loss.item(), "acc": acc}, step=step)

API
    ``log(metrics, step=None)``  record numeric metrics (a dict of name -> number).
        The call only appends to an in-memory buffer (well under a microsecond
        of work); a daemon thread writes the buffer to ``$LABDECK_METRICS_FILE``
        every 0.1 s, at once when more than ~10,000 points wait, and at exit.
        ``step`` defaults to one more than the previous step of this process
        (0 first), so explicit and implicit steps mix the way they do in wandb.
        Any thread may call it (no lock: threads that rely on automatic steps
        at the same moment can get the same step).
    ``config(params)``  record run parameters (one line per call; readers merge them in order) and
        return them. In a rerun with changes (``labdeck rerun RUN --set model.layers=12``, or ``R``
        in the TUI) the parameters that are not on the command line come in ``$LABDECK_PARAMS`` (a
        JSON object, dotted keys for nested dicts); ``config`` applies them to ``params`` in place
        (converted to the type of the value they replace) before recording, so use the dict you
        passed, or the one returned, after calling it.
    ``use(run_id, path)``  declare that this run loads ``path`` of run ``run_id`` (lineage)
        and return where that artifact lies on this instance:
        ``<runs root>/<run_id>/<path>``, the runs root being the parent of
        ``$LABDECK_RUN_DIR`` (an absolute ``path`` comes back unchanged).
    ``flush(timeout=5.0)``  write everything logged so far; True when all of it was written within ``timeout`` s.
    ``run_id()``  this run's id (``$LABDECK_RUN_ID``), or None outside labdeck.
    ``labdeck.dropped``  metric values dropped as non-numeric so far (reported once at exit).
    ``labdeck.lost``  lines that could not be written so far (reported when first seen and at exit).

The file: one JSON object per line, written with ``O_APPEND`` and one ``write``
per batch of whole lines (so processes that share it, such as forked DataLoader
workers, never interleave within a line)::

    {"t":1718000000.123,"s":12,"m":{"loss":0.31,"acc":0.9}}
    {"t":1718000000.456,"config":{"lr":0.0003,"batch_size":64}}
    {"t":1718000000.789,"use":{"run":"01J9Z3…","path":"ckpt/final.pt"}}

Values: ints and floats as they are; bools as 0/1; anything else through
``.item()`` (numpy and torch scalars) and ``float()``; NaN and ±inf as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (so every line is strict
JSON). A value that is not a number is dropped and counted. Conversion happens
in the writer thread, up to 0.1 s after ``log()``: log plain numbers (``.item()``),
not tensors that are later changed in place or that hold an autograd graph.

It never blocks or crashes the training: ``log()`` does not raise; write
errors (disk full, file or directory gone) cost the points of that batch,
are counted and reported once on stderr, and the next batch is tried again.
Memory is bounded: past 1,000,000 waiting points (a job logging faster than
its points can be written, some 500,000 a second) ``log()`` yields 5 ms to the
writer per call while the writer makes progress, and drops the oldest half
(counted as lost) if the writer has been stuck for 2 s (a hung filesystem).
Outside labdeck (no ``$LABDECK_METRICS_FILE``) points are discarded after a
note on stderr, or written to ``./labdeck-metrics.jsonl`` with
``LABDECK_METRICS_FALLBACK=1``.

On exit (atexit, and multiprocessing's exit hooks in forked workers) and on
SIGTERM, SIGINT and SIGHUP the buffer is flushed (bounded wait). Signal
handlers are installed at the first ``log()``/``config()`` from the main
thread, only where the signal still has its default handler; after flushing,
the handler restores that default and raises the signal again, so the process
dies (or raises KeyboardInterrupt) as it would have. A process killed with
SIGKILL or leaving through ``os._exit`` loses at most its last 0.1 s. (Like
any Python signal handler, it runs when the main thread next executes Python
code: a main thread stuck inside a C call dies at labdeck's SIGKILL, 10 s
after the SIGTERM of a cancel, rather than at the SIGTERM.)

Inside a labdeck run, importing the module also records the job's Python (``sys.executable``,
its version and packages) in ``$LABDECK_RUN_DIR/environment.json``, from a daemon thread: what
labdeck serves, opens notebooks and exports with is the interpreter the job really ran.

Standard library only; Python 3.8+.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time

__all__ = ["log", "config", "use", "checkpoint", "resume_from", "flush", "run_id", "dropped", "lost"]
__version__ = "1"

FLUSH_INTERVAL_S = 0.1  # the writer thread's period
HIGH_WATER = 10_000  # more points than this waiting: wake the writer at once
MAX_BUFFERED = 1_000_000  # more than this waiting: log() yields to the writer; if it is stuck, drop the oldest
STUCK_S = 2.0  # the writer made no progress for this long: it is stuck (a hung filesystem)
CHUNK = 20_000  # points per write() at most
_HIGH_LEN = 3 * HIGH_WATER  # the same, in list items (three per point)
_MAX_LEN = 3 * MAX_BUFFERED
SIGNAL_FLUSH_TIMEOUT_S = 2.0  # labdeck's cancel sends SIGKILL 10 s after SIGTERM
EXIT_FLUSH_TIMEOUT_S = 5.0
FALLBACK_FILE = "labdeck-metrics.jsonl"

dropped = 0  # non-numeric metric values dropped (this process)
lost = 0  # lines that could not be written (this process)

# ---- state -------------------------------------------------------------------
# The hot path (log) only extends _buf by one (time, step, metrics) triple: flat, so that
# a million waiting points are not a million tuples for the garbage collector to walk;
# list.extend is atomic under the GIL. The writer takes triples off its front under
# _take_lock (slice, then del of the same count: extends that race with it land behind).
_buf: list = []
_extend = _buf.extend
_time = time.time
_next_step = 0
_started = False  # writer thread, atexit and signal handlers set up (in this process)
_kicked = False  # the writer was woken for a full buffer and has not taken it yet

_path: str | None = None  # where lines go; None: discard
_thread: threading.Thread | None = None
_wake = threading.Event()
_io_lock = threading.Lock()  # one writer at a time: keeps lines in order
_io_owner: int | None = None
_take_lock = threading.Lock()  # held only to take items off the buffer's front (or to trim it)
_progress_at = 0.0  # time.monotonic() of the writer's last progress
_key_cache: dict = {}  # metric name -> its JSON encoding + ":"
_start_lock = threading.RLock()
_cv = threading.Condition(threading.RLock())  # flush() waits on it for the writer's rounds
_requested = 0  # flush rounds asked for
_done = 0  # flush rounds completed
_done_ok = True  # whether the last completed round wrote everything it took
_need_newline = False  # a partial write left a line unterminated
_first_drop: tuple | None = None
_lost_reported = False
_exit_reported = False
_atexit_registered = False
_exited = False  # the exit flush ran: later log() calls (other atexit hooks) write synchronously
_signals_tried = False
_prev_handlers: dict = {}

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


# ---- API -----------------------------------------------------------------------
def log(metrics, step=None):
    """Record ``metrics`` (name -> number) at ``step`` (default: the previous step + 1). Never raises."""
    global _next_step
    try:
        m = metrics.copy()
        if step is None:
            step = _next_step
        _next_step = step + 1
        _extend((_time(), step, m))
        if len(_buf) > _HIGH_LEN:
            _overflow()
        if not _started:
            _start()
    except Exception:
        _log_slow(metrics, step)


def _overrides():
    """The parameters a rerun changed off the command line: ``$LABDECK_PARAMS`` (a JSON object), else {}."""
    raw = os.environ.get("LABDECK_PARAMS", "")
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except ValueError:
        return {}
    return obj if type(obj) is dict else {}


def _like(new, old):
    """``new`` as the type of the value it replaces, when it converts (3 → 3.0 for a float lr)."""
    if old is None or type(new) is type(old) or type(old) not in (int, float, str, bool):
        return new
    try:
        if type(old) is bool:
            return new if type(new) is bool else str(new).lower() in ("1", "true", "yes")
        return type(old)(new)
    except (TypeError, ValueError):
        return new


def config(params):
    """Record run parameters (a dict) and return it, with a rerun's changes (``$LABDECK_PARAMS``)
    applied in place first; written within milliseconds. Never raises."""
    try:
        if type(params) is dict:
            for key, value in _overrides().items():
                parts = str(key).split(".")
                node = params
                for p in parts[:-1]:  # a dotted key names a nested dict: model.layers
                    if type(node.get(p)) is not dict:
                        node = None
                        break
                    node = node[p]
                if node is None or (parts[-1] not in node and key in params):
                    node, parts = params, [key]  # a key that itself has dots
                node[parts[-1]] = _like(value, node.get(parts[-1]))
        _line({"t": _time(), "config": params})
    except Exception:
        pass
    return params


def checkpoint(path, step=None):
    """Declare ``path`` (relative to the run directory, or absolute) this run's latest checkpoint.

    labdeck copies it off the instance as the run goes, so a run whose spot instance is taken
    away can be relaunched from it (``resume_from()`` in the new run). Never raises."""
    try:
        p = os.path.abspath(os.fspath(path))
        _line({"t": _time(), "checkpoint": {"path": p, "step": step}})
        flush()
    except Exception:
        pass


def resume_from():
    """The checkpoint to resume from when this run relaunches a preempted one, else None."""
    return os.environ.get("LABDECK_RESUME_FROM") or None


def use(run_id, path):
    """Declare that this run loads ``path`` of run ``run_id``; return that artifact's path on this instance."""
    run = str(run_id)
    p = os.fspath(path)
    try:
        _line({"t": _time(), "use": {"run": run, "path": p}})
    except Exception:
        pass
    if os.path.isabs(p):
        return p
    run_dir = os.environ.get("LABDECK_RUN_DIR") or ""
    root = os.path.dirname(run_dir.rstrip("/" + os.sep)) if run_dir else ""
    return os.path.join(root, run, p) if root else os.path.join(run, p)


def flush(timeout=5.0):
    """Write everything logged so far; wait at most ``timeout`` seconds. True when all was written."""
    global _requested
    try:
        if _started and not _signals_tried:
            _install_signals()
        t = _thread
        if t is None or not t.is_alive() or t is threading.current_thread():
            return _flush_now(timeout)
        with _cv:
            _requested += 1
            mine = _requested
        _wake.set()
        deadline = time.monotonic() + timeout
        with _cv:
            while _done < mine:
                left = deadline - time.monotonic()
                if left <= 0 or not t.is_alive():
                    return False
                _cv.wait(min(left, 0.5))
            return _done_ok
    except Exception:
        return False


def run_id():
    """This run's id (``$LABDECK_RUN_ID``), or None outside labdeck."""
    return os.environ.get("LABDECK_RUN_ID") or None


# ---- slow paths of the API ----------------------------------------------------------
def _log_slow(metrics, step):
    """log() when the fast path failed: a mapping without .copy(), an odd step. Never raises."""
    global _next_step
    try:
        try:
            m = dict(metrics)
        except Exception:
            _count_drop("<log() argument>", metrics)
            return
        s = None if step is None else _number(step)
        if s is None or isinstance(s, str):  # no step, or not a finite number: the automatic one
            s = _next_step if isinstance(_next_step, (int, float)) else 0
        _next_step = s + 1
        _extend((_time(), s, m))
        if not _started:
            _start()
    except Exception:
        pass


def _line(doc):
    """Queue one pre-encoded line (config/use) and have the writer write it now."""
    try:
        text = _encode(doc)
    except Exception:
        text = _encode(_jsonable(doc, 0))
    _extend((None, text, None))
    if not _started:
        _start()
    elif not _signals_tried:
        _install_signals()
    t = _thread
    if t is not None and t.is_alive():
        _wake.set()
    else:
        _flush_now(1.0)


def _overflow():
    """More than HIGH_WATER points wait: wake the writer. More than MAX_BUFFERED: log() is faster than
    the points can be written: yield to the writer while it makes progress, drop the oldest if it is stuck."""
    global _kicked, lost
    try:
        if _kicked and len(_buf) <= _MAX_LEN:
            return
        t = _thread
        alive = t is not None and t.is_alive() and t is not threading.current_thread()
        if alive:
            _kicked = True
            _wake.set()
        if len(_buf) <= _MAX_LEN:
            if not alive and _started:
                _flush_now(1.0)
            return
        if alive and time.monotonic() - _progress_at < STUCK_S:
            time.sleep(0.005)  # the writer runs meanwhile
            return
        with _take_lock:
            k = len(_buf) // 6 * 3
            del _buf[:k]
        k //= 3
        lost += k
        _note_lost("the writer is stuck")
    except Exception:
        pass


# ---- the writer -----------------------------------------------------------------------
def _start():
    """First log()/config() of this process: pick the file, start the writer, hook exit and signals."""
    global _started, _path, _atexit_registered
    if _exited:
        _flush_now(1.0)
        return
    if not _start_lock.acquire(timeout=1.0):
        return
    try:
        if _started:
            return
        _started = True
        _path = _metrics_path()
        _start_thread()
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_at_exit)
        _install_signals()
        _hook_multiprocessing_exit()
    except Exception:
        pass
    finally:
        _start_lock.release()


def _metrics_path():
    path = os.environ.get("LABDECK_METRICS_FILE")
    if path:
        return path
    if os.environ.get("LABDECK_METRICS_FALLBACK") == "1":
        return os.path.abspath(FALLBACK_FILE)
    _note("labdeck: LABDECK_METRICS_FILE is not set (not running under labdeck): metric points are discarded; "
          f"set LABDECK_METRICS_FALLBACK=1 to write them to ./{FALLBACK_FILE}")
    return None


def _start_thread():
    global _thread
    t = threading.Thread(target=_writer, name="labdeck-writer", daemon=True)
    t.start()
    _thread = t


def _writer():
    global _done, _done_ok, _progress_at
    while True:
        try:
            _progress_at = time.monotonic()
            _wake.wait(FLUSH_INTERVAL_S)
            _wake.clear()
            with _cv:
                asked = _requested
            ok = _flush_now(None)
            with _cv:
                if asked > _done:
                    _done = asked
                    _done_ok = ok
                _cv.notify_all()
        except Exception:
            time.sleep(FLUSH_INTERVAL_S)


def _flush_now(timeout):
    """Take what is buffered, encode it and append it to the file, in the calling thread
    (in chunks; only what was there when it began). True when all of that was written."""
    global _io_owner, _kicked, _progress_at
    me = threading.get_ident()
    if _io_owner == me:  # a signal handler interrupted this thread's own flush
        return False
    if not _io_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
        return False
    _io_owner = me
    ok = True
    try:
        budget = len(_buf)
        while budget > 0:
            with _take_lock:
                n = min(len(_buf), budget, 3 * CHUNK) // 3 * 3
                items = _buf[:n]
                del _buf[:n]
            if not n:
                break
            budget -= n
            _kicked = False
            _progress_at = time.monotonic()
            if _path is not None:
                data, lines = _encode_batch(items)
                del items
                if data and not _write(data, lines):
                    ok = False
                _progress_at = time.monotonic()
        return ok
    except Exception:
        return False
    finally:
        _io_owner = None
        _io_lock.release()


def _encode_batch(items):
    """(bytes of whole lines, how many lines). Plain str -> int/float dicts take the fast path."""
    out = []
    keys = _key_cache
    it = iter(items)
    for t, s, m in zip(it, it, it):
        if t is None:  # config/use: encoded already
            out.append(s)
            continue
        try:
            c = s.__class__
            if c is int:
                step = repr(s)
            elif s is None:
                step = "null"
            elif c is float and s - s == 0:
                step = repr(s)
            else:
                raise TypeError
            parts = []
            for k, v in m.items():
                c = v.__class__
                if c is not float and c is not int:
                    raise TypeError
                r = repr(v)
                if "n" in r:  # nan, inf, -inf
                    raise ValueError
                ek = keys.get(k)
                if ek is None:
                    ek = _encode_key(k)
                parts.append(ek + r)
            line = '{"t":' + repr(t) + ',"s":' + step + ',"m":{' + ",".join(parts) + "}}"
        except Exception:  # odd values, keys or step; NaN/inf; not a dict
            line = _encode_slow(t, s, m)
            if line is None:
                continue
        out.append(line)
    if not out:
        return b"", 0
    out.append("")
    return "\n".join(out).encode("utf-8"), len(out) - 1


def _encode_key(k):
    if k.__class__ is not str:
        raise TypeError
    ek = _encode(k) + ":"
    if len(_key_cache) < 10_000:
        _key_cache[k] = ek
    return ek


def _encode_slow(t, s, m):
    """One point with odd values: convert them (numbers, 0/1, NaN strings), drop what is not a number."""
    try:
        try:
            pairs = list(m.items())
        except Exception:
            pairs = list(dict(m).items())
    except Exception:
        _count_drop("<log() argument>", m)
        return None
    clean = {}
    for k, v in pairs:
        x = _number(v)
        if x is None:
            _count_drop(k, v)
            continue
        clean[k if isinstance(k, str) else str(k)] = x
    if not clean:
        return None
    step = None if s is None else _number(s)
    if isinstance(step, str):  # NaN/inf step: none
        step = None
    try:
        t = float(t)
        return _encode({"t": t, "s": step, "m": clean})
    except Exception:
        return None


def _number(v):
    """int/float for a numeric value (bools 0/1; NaN/inf as strings); None when it is not a number."""
    c = v.__class__
    if c is int:
        return v
    if c is not float:
        if c is bool:
            return int(v)
        try:
            item = getattr(v, "item", None)
            if item is not None and callable(item):
                v = item()
            if isinstance(v, bool):
                return int(v)
            if isinstance(v, int):
                return int(v)
            v = float(v)
        except Exception:
            return None
    if v - v == 0:  # finite
        return v
    return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")


def _jsonable(obj, depth):
    """``obj`` as something json can encode strictly (for config/use; cycles and odd objects as strings)."""
    try:
        if obj is None or isinstance(obj, (str, bool, int)):
            return obj
        if isinstance(obj, float):
            return _number(obj)
        if depth > 32:
            return repr(obj)[:200]
        if isinstance(obj, dict):
            return {(k if isinstance(k, str) else str(k)): _jsonable(v, depth + 1) for k, v in obj.items()}
        if isinstance(obj, (list, tuple, set, frozenset)):
            return [_jsonable(v, depth + 1) for v in obj]
        if hasattr(obj, "__fspath__"):
            return os.fspath(obj)
        item = getattr(obj, "item", None)
        if item is not None and callable(item):
            try:
                return _jsonable(item(), depth + 1)
            except Exception:
                pass
        return str(obj)
    except Exception:
        return "<unrepresentable>"


def _write(data, lines):
    """Append ``data`` (whole lines) with one write (O_APPEND); on an error count the lines as lost. True if written."""
    global lost, _need_newline
    path = _path
    written = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if _need_newline:
                data = b"\n" + data
                _need_newline = False
            view = memoryview(data)
            while written < len(data):
                n = os.write(fd, view[written:])
                if n <= 0:
                    raise OSError(f"wrote {n} bytes")
                written += n
        finally:
            os.close(fd)
        return True
    except Exception as e:
        if written:
            _need_newline = not data[:written].endswith(b"\n")
        gone = lines - data[:written].count(b"\n")
        lost += gone
        _note_lost(f"cannot write to {path} ({getattr(e, 'strerror', None) or e})")
        return False


# ---- reporting ------------------------------------------------------------------------
def _note(text):
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def _note_lost(why):
    global _lost_reported
    if not _lost_reported:
        _lost_reported = True
        _note(f"labdeck: {why}: {lost} metric point(s) lost so far; training continues "
              "(labdeck retries at the next flush, this is reported once)")


def _count_drop(key, value):
    global dropped, _first_drop
    dropped += 1
    if _first_drop is None:
        _first_drop = (key, type(value).__name__)


def _report():
    """Once per process: what was dropped or lost."""
    global _exit_reported
    if _exit_reported:
        return
    _exit_reported = True
    if dropped:
        key, kind = _first_drop or ("?", "?")
        _note(f"labdeck: dropped {dropped} non-numeric metric values (first: key={key}, a {kind})")
    if lost:
        _note(f"labdeck: {lost} metric point(s) could not be written to {_path}")


def _at_exit():
    global _exited, _started
    try:
        _exited = True
        flush(EXIT_FLUSH_TIMEOUT_S)
        _started = False  # from now on log() goes through _start(), which writes at once
        _report()
    except Exception:
        pass


# ---- signals, fork, multiprocessing ------------------------------------------------------
def _install_signals():
    """Flush on SIGTERM/SIGINT/SIGHUP where the signal still has Python's default handler (main thread only)."""
    global _signals_tried
    if threading.current_thread() is not threading.main_thread():
        return  # tried again from the main thread (config, use, flush)
    _signals_tried = True
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_DFL or prev is signal.default_int_handler:
                signal.signal(sig, _on_signal)
                _prev_handlers[sig] = prev
        except (ValueError, OSError, RuntimeError, TypeError):
            pass


def _on_signal(signum, frame):
    """Flush, put the previous handler back, raise the signal again: the process ends as it would have."""
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    try:
        flush(SIGNAL_FLUSH_TIMEOUT_S)
        if prev is signal.SIG_DFL:  # the process dies right after: no atexit
            _report()
    except Exception:
        pass
    try:
        signal.signal(signum, prev)
    except Exception:
        pass
    if hasattr(signal, "raise_signal"):
        signal.raise_signal(signum)
    else:  # pragma: no cover (Python < 3.8)
        os.kill(os.getpid(), signum)


def _hook_multiprocessing_exit():
    """multiprocessing children end with os._exit (no atexit) but run its finalizers first."""
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    try:
        util.Finalize(None, _at_exit, exitpriority=100)
    except Exception:
        pass


def _after_fork_in_child():
    """A forked child starts clean: no parent points (the parent writes them), its own writer on first log()."""
    global _thread, _started, _kicked, _io_lock, _io_owner, _take_lock, _start_lock, _cv, _wake, _requested, _done
    global dropped, lost, _first_drop, _lost_reported, _exit_reported, _done_ok
    del _buf[:]
    _thread = None
    _started = False
    _kicked = False
    _wake = threading.Event()
    _io_lock = threading.Lock()
    _io_owner = None
    _take_lock = threading.Lock()
    _start_lock = threading.RLock()
    _cv = threading.Condition(threading.RLock())
    _requested = _done = 0
    _done_ok = True
    dropped = lost = 0
    _first_drop = None
    _lost_reported = _exit_reported = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- the interpreter the job runs, for the record ---------------------------------------
def _record_environment(run_dir):
    """Write ``<run dir>/environment.json`` as this process sees it: the interpreter the job really
    runs (``sys.executable``: a venv's, whatever the command line or PATH said), its version and
    its packages. The wrapper's own guess (the command's first word) is only linked in where this
    has not written first; a later importer of the same run (a subprocess) leaves the first one's."""
    target = os.path.join(run_dir, "environment.json")
    tmp = os.path.join(run_dir, "lib", ".environment.json.%d" % os.getpid())
    try:
        try:
            with open(target, encoding="utf-8") as f:
                if json.load(f).get("recorded_by") == "job":
                    return
        except Exception:
            pass
        import platform

        try:
            import importlib.metadata as md

            pk = sorted({"%s==%s" % (d.metadata["Name"], d.version) for d in md.distributions() if d.metadata["Name"]})
        except Exception:
            pk = []
        doc = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
               "packages": pk[:3000], "recorded_by": "job"}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, target)
    except Exception:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _start_environment_record():
    """At import, inside a labdeck run (its run directory has the ``lib/`` this file came in): record
    the environment in a daemon thread, off the job's main thread."""
    run_dir = os.environ.get("LABDECK_RUN_DIR")
    if not run_dir or not sys.executable or not os.path.isdir(os.path.join(run_dir, "lib")):
        return
    try:
        threading.Thread(target=_record_environment, args=(run_dir,), name="labdeck-environment", daemon=True).start()
    except Exception:
        pass


_start_environment_record()
