"""Lineage: what each run records, how runs relate, and notes/tags by anyone.

At launch a run records who, when, the instance (provider, size, GPUs), the
command and its parameters (``--lr 3e-4`` / ``lr=3e-4`` in argv, and the JSON,
TOML or simple YAML config files the command names), and its code (commit,
diff, untracked files). While it runs and when it ends, labdeck adds what the
run itself reports: ``labdeck.config()`` parameters, the metrics summary
(last / best / min / max per metric), the mean GPU utilization of its GPUs,
the Python environment on the instance, its artifacts (files it wrote in its
run directory), and parents discovered from ``labdeck.use(run, path)``.

Parents: ``--parent``, reruns, and ``use`` make :class:`backends.models.Edge`
records (kind parent / rerun / uses); ``Run.parent`` is the primary one, drawn
as the tree. Edges that would make a cycle are refused.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterable

from .errors import LabdeckError, NotFoundError
from .models import Annotation, Edge, Run

CONFIG_SUFFIXES = (".json", ".toml", ".yaml", ".yml")
PARAM_NAME = re.compile(r"[A-Za-z_][\w.\-/]*")  # a parameter name: what --set, k=v output and the rerun form take
_KV = re.compile(rf"^\+*({PARAM_NAME.pattern})=(.*)$")
MAX_PARAMS = 500


def _value(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _simple_yaml(text: str) -> dict[str, Any]:
    """Flat and indented ``key: value`` YAML (no lists or anchors): enough for typical training configs."""
    out: dict[str, Any] = {}
    stack: list[tuple[int, str]] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith(("#", "-")) or ":" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        key, _, val = line.strip().partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = ".".join([s for _, s in stack] + [key.strip().strip("'\"")])
        if val.strip():
            out[full] = _value(val.strip().strip("'\""))
        else:
            stack.append((indent, key.strip()))
    return out


def params_from_command(command: str, code_dir: Path | None = None) -> dict[str, Any]:
    """Parameters a command line names: ``--key value``, ``--key=value``, ``key=value`` (Hydra),
    and the contents of JSON/TOML/YAML files it mentions (argv wins over files)."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    params: dict[str, Any] = {}
    from_files: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and len(tok) > 2:
            key = tok[2:]
            if "=" in key:
                key, val = key.split("=", 1)
                params[key] = _value(val)
            elif i + 1 < len(tokens) and not _KV.match(tokens[i + 1]) and (
                    not tokens[i + 1].startswith("-") or _is_number(tokens[i + 1])):
                params[key] = _value(tokens[i + 1])
                i += 1
            else:
                params[key] = True
        elif (m := _KV.match(tok)) and i > 0:
            params[m.group(1)] = _value(m.group(2))
        i += 1
    if code_dir is not None:
        for tok in tokens:  # config files named anywhere (also as the value of --config)
            if tok.endswith(CONFIG_SUFFIXES) and "=" not in tok:
                from_files.update(_read_config(code_dir / tok))
    merged = {**from_files, **params}
    return dict(list(merged.items())[:MAX_PARAMS])


def _is_number(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def _read_config(path: Path) -> dict[str, Any]:
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return {}
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            return _simple_yaml(text)
        return flatten(data) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ---- relations ------------------------------------------------------------------

def parents_map(runs: dict[str, Run], edges: list[Edge]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in runs.values():
        if r.parent:
            out.setdefault(r.id, set()).add(r.parent)
    for e in edges:
        out.setdefault(e.child, set()).add(e.parent)
    return out


def ancestors(run_id: str, parents: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(parents.get(run_id, ()))
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(parents.get(p, ()))
    return seen


def check_no_cycle(child: str, parent: str, parents: dict[str, set[str]]) -> None:
    if parent == child or child in ancestors(parent, parents):
        raise LabdeckError(f"Making {parent[-8:].lower()} a parent of {child[-8:].lower()} would make a cycle in the lineage.")


def path_from_baseline(run: Run, runs: dict[str, Run]) -> list[Run]:
    """The chain of primary parents from the root down to ``run``."""
    chain = [run]
    seen = {run.id}
    while chain[0].parent and chain[0].parent in runs and chain[0].parent not in seen:
        chain.insert(0, runs[chain[0].parent])
        seen.add(chain[0].id)
    return chain


def params_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every parameter added (old None), removed (new None) or changed."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if a != b:
            out.append((k, None if a is _MISSING else a, None if b is _MISSING else b))
    return out


_MISSING = object()


def key_metric(runs: list[Run]) -> str | None:
    """The metric the project cares about: the first name with "loss", else the most common one."""
    counts: dict[str, int] = {}
    for r in runs:
        for name in r.metrics_summary:
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return None
    losses = sorted(n for n in counts if "loss" in n.lower())
    val = [n for n in losses if "val" in n.lower()]
    if val:
        return val[0]
    if losses:
        return losses[0]
    return max(sorted(counts), key=lambda n: counts[n])


# ---- annotations ----------------------------------------------------------------

def annotate(store, run_ref: str, kind: str, text: str) -> Annotation:
    """A note or tag by the current user on any run (kept in their own store)."""
    run = store.find_run(run_ref)
    text = text.strip()
    if not text:
        raise LabdeckError(f"An empty {kind}.")
    if kind == "tag" and not re.fullmatch(r"[\w.\-/]+", text):
        raise LabdeckError(f"Tag {text!r}: use letters, digits and . - _ / only.")
    a = Annotation(run_id=run.id, kind=kind, text=text, user=store.user)
    store.add(a)
    return a


def untag(store, run_ref: str, tag: str) -> int:
    """Take the current user's tag off a run. Returns how many were removed."""
    run = store.find_run(run_ref)
    n = 0
    for doc in store.mine.all("annotations"):
        if doc["run_id"] == run.id and doc["kind"] == "tag" and doc["text"] == tag and not doc.get("removed"):
            store.mine.mutate("annotations", doc["id"], lambda d: {**d, "removed": True})
            n += 1
    if not n:
        raise NotFoundError(f"You have no tag {tag!r} on {run.display_name}.")
    return n


def annotations_by_run(store) -> tuple[dict[str, list[Annotation]], dict[str, str]]:
    recs, errors = store.records("annotations")
    out: dict[str, list[Annotation]] = {}
    for a in sorted(recs, key=lambda a: a.id):
        out.setdefault(a.run_id, []).append(a)
    return out, errors


def tags_of(annotations: list[Annotation], own: Iterable[str] = ()) -> list[str]:
    """A run's tags: its own (``Run.tags``) and every tag some user has on it. Each user's "tag"
    annotations with the same text are read in time order and the last one counts: one with
    ``removed`` means that user took the tag off (:func:`untag`); another user's stays. The tree's
    labels, ``labdeck show`` and the query language's ``tag:`` all read tags through this."""
    on: dict[tuple[str, str], bool] = {}
    for a in sorted((a for a in annotations if a.kind == "tag"), key=lambda a: (a.created_at or "", a.id)):
        on[(a.user, a.text)] = not a.removed
    return sorted(set(own) | {t for (_, t), v in on.items() if v})


# ---- the team's view --------------------------------------------------------------

class TeamLineage:
    """Everyone's runs, edges and annotations, read together (teammates' unreadable stores reported)."""

    def __init__(self, store) -> None:
        runs, self.errors = store.runs()
        self.runs: dict[str, Run] = {r.id: r for r in runs}
        edges, e2 = store.records("edges")
        self.edges: list[Edge] = [e for e in edges if isinstance(e, Edge)]
        self.annotations, e3 = annotations_by_run(store)
        self.errors.update(e2)
        self.errors.update(e3)
        self.parents = parents_map(self.runs, self.edges)
        self.children: dict[str, list[str]] = {}
        for child, ps in self.parents.items():
            for p in ps:
                self.children.setdefault(p, []).append(child)

    def tags(self, run_id: str) -> list[str]:
        run = self.runs.get(run_id)
        return tags_of(self.annotations.get(run_id, []), run.tags if run else ())

    def notes(self, run_id: str) -> list[Annotation]:
        return [a for a in self.annotations.get(run_id, []) if a.kind == "note"]

    def parent_of(self, run: Run) -> Run | None:
        return self.runs.get(run.parent) if run.parent else None


def metric_value(run: Run, name: str | None, which: str = "last") -> float | None:
    if not name:
        return None
    v = run.metrics_summary.get(name, {}).get(which)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def code_diff(a: Run | None, b: Run, read_blob) -> str:
    """What changed in the code from run ``a`` to run ``b``: the commits between them (when the
    repository is on this machine) and each run's own uncommitted changes. ``read_blob(user, name)``."""
    from .code import git

    parts: list[str] = []
    ca, cb = (a.code.get("commit") if a else None), b.code.get("commit")
    root = b.code.get("root")
    if a is not None and ca and cb and ca != cb and isinstance(root, str) and Path(root).is_dir() \
            and a.code.get("root") == root:
        res = git(root, "diff", "--no-color", ca, cb, check=False)  # (ext diff, textconv, fsmonitor off)
        if res.returncode == 0 and res.stdout:
            parts.append(f"# commits {ca[:10]} → {cb[:10]}\n" + res.stdout.decode("utf-8", "replace"))
    elif a is not None and ca != cb:
        parts.append(f"# commit {str(ca)[:10]} → {str(cb)[:10]} (the repository is not on this machine: commits not shown)\n")
    for label, run in (("before", a), ("this run", b)):
        if run is not None and run.code.get("diff_blob"):
            blob = read_blob(run.user, run.code["diff_blob"]) or b""
            if blob:
                parts.append(f"# uncommitted changes ({label}: {run.display_name})\n" + blob.decode("utf-8", "replace"))
    return "\n".join(parts)


# ---- rerun with changes -------------------------------------------------------------
PARAMS_ENV = "LABDECK_PARAMS"  # JSON object: parameters a rerun changed that are not on the command line


def _arg_patterns(key: str) -> list[re.Pattern]:
    """Where ``key`` sits in a command line, the value as group 1: ``--key=V``, ``--key V``, ``key=V`` (Hydra,
    also ``+key=V``). A value is one shell word: quoted, or up to the next blank or shell operator."""
    k = re.escape(key)
    val = r"('[^']*'|\"(?:[^\"\\]|\\.)*\"|[^\s;&|<>()'\"]+)"
    return [re.compile(rf"(?<!\S)--{k}={val}"), re.compile(rf"(?<!\S)--{k}\s+(?!-[^\d.])" + val),
            re.compile(rf"(?<![\S])\+*{k}={val}")]


def _quote_context(command: str, pos: int, *, inner: bool = True) -> str:
    """The shell quoting ``command[pos]`` sits in: "" (none), "'" or '"' (as sh reads the line), or
    "nested" when the quoted text up to there opens quotes of its own (``sh -c "sh -c '... V'"``)."""
    ctx, i, opened = "", 0, 0
    while i < pos:
        c = command[i]
        if ctx == "'":
            ctx = "" if c == "'" else ctx
        elif c == "\\":
            i += 1  # the next character is taken as it is (outside single quotes)
        elif ctx == '"':
            ctx = "" if c == '"' else ctx
        elif c in "'\"":
            ctx, opened = c, i + 1
        i += 1
    if ctx and inner:  # what the inner shell reads of the quoted text so far must itself be outside quotes
        text = command[opened:pos]
        if ctx == '"':
            text = re.sub(r'\\([\\"$`])', r"\1", text)
        if _quote_context(text, len(text), inner=False) != "":
            return "nested"
    return ctx


def _quote_in(value: str, ctx: str) -> str:
    """``value`` as one shell word for the command run inside ``ctx`` quotes (``sh -c '... --lr V'``):
    quoted for that inner shell, then escaped so the quotes around it stay as they were."""
    q = shlex.quote(value)
    if ctx == "'":
        return q.replace("'", "'\\''")
    if ctx == '"':
        return re.sub(r'([\\"$`])', r"\\\1", q)
    return q


def set_params(command: str, recorded: dict[str, Any], sets: dict[str, str]) -> tuple[str, dict[str, Any], list[tuple[str, Any, Any, str]]]:
    """Apply ``sets`` (key → new value, as typed) to a run's ``command``: (new command, parameters for
    :data:`PARAMS_ENV`, and one (key, old, new, how) line per change).

    A key written in the command (``--lr 0.1``, ``--lr=0.1``, ``lr=0.1``) gets its value rewritten
    there, in place (the rest of the command is left byte for byte); a key the run recorded only through
    ``labdeck.config()`` or a config file goes to the job in ``$LABDECK_PARAMS``, which ``labdeck.config()``
    applies to the dict it is given. Any other key is refused: it would silently change nothing."""
    out_cmd = command
    env_params: dict[str, Any] = {}
    changes: list[tuple[str, Any, Any, str]] = []
    for key, raw in sets.items():
        if not PARAM_NAME.fullmatch(key or ""):
            raise LabdeckError(f"--set {key}={raw}: {key!r} is not a parameter name.",
                               "Give KEY=VALUE, e.g. --set lr=3e-4 (dotted keys for nested config: model.layers=12).")
        new = _value(raw)
        for pat in _arg_patterns(key):
            m = pat.search(out_cmd)
            if m:
                old = m.group(1)
                ctx = _quote_context(out_cmd, m.start(1))
                if ctx == "nested" or ctx != _quote_context(out_cmd, m.end(1)):
                    raise LabdeckError(f"--set {key}: its value in the command is quoted in a way labdeck does not "
                                       f"rewrite ({old}).",
                                       "Change the command itself with: labdeck rerun RUN -- NEW COMMAND")
                out_cmd = out_cmd[:m.start(1)] + _quote_in(str(raw), ctx) + out_cmd[m.end(1):]
                changes.append((key, _value(old.strip("'\"")), new, "command"))
                break
        else:
            if key not in recorded:
                known = ", ".join(sorted(map(str, recorded))[:12]) or "none"
                raise LabdeckError(
                    f"--set {key}: {key} is neither in the command nor a parameter the run recorded (its parameters: {known}).",
                    "Change the command itself with: labdeck rerun RUN -- NEW COMMAND")
            env_params[key] = new
            changes.append((key, recorded.get(key), new, PARAMS_ENV))
    return out_cmd, env_params, changes
