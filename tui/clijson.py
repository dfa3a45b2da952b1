"""What ``--json`` prints: one object per run, instance, deployment or size, with stable field names.

These names are an interface (scripts read them): the README's "JSON output" section lists them.
Add fields freely; never rename or drop one. Times are the records' own UTC ISO strings (null when
not yet), money is in dollars, durations in seconds. Values come from records as they are
(a teammate's text included): JSON is data, escaped by :func:`tui.cliutil.print_json`."""

from __future__ import annotations

import math
from typing import Any

from backends.models import Deployment, Instance, Run

from .format import short_id


def _number(v: Any) -> float | None:
    """A number for a money or size field, or null (a hand-edited record may hold anything)."""
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _cost(r: Run) -> float | None:
    try:
        return round(r.cost(), 6)
    except (TypeError, ValueError, OverflowError):
        return None


def run_summary(r: Run) -> dict[str, Any]:
    """A run as ``labdeck ps --json`` lists it."""
    d = r.duration_seconds()
    return {
        "id": r.id, "short_id": short_id(r.id), "name": r.display_name, "user": r.user, "state": r.state,
        "state_reason": r.state_reason, "kind": r.kind, "instance": r.instance, "command": r.command,
        "parent": r.parent, "pid": r.pid, "exit_code": r.exit_code, "created_at": r.created_at,
        "started_at": r.started_at, "ended_at": r.ended_at, "duration_seconds": round(d, 3) if d is not None else None,
        "price_per_hour": _number(r.price_per_hour), "cost_usd": _cost(r), "last_line": r.last_line,
    }


def run_with_lineage(r: Run, tl) -> dict[str, Any]:
    """A run as ``labdeck runs --json`` lists it: the summary, its params, metrics, tags and parents."""
    return {**run_summary(r), "params": r.params, "metrics": r.metrics_summary, "tags": tl.tags(r.id),
            "parents": sorted(tl.parents.get(r.id, ()))}


def run_detail(r: Run, tl) -> dict[str, Any]:
    """Everything ``labdeck show --json`` knows about a run."""
    return {**run_with_lineage(r, tl), "origin_host": r.origin_host, "workdir": r.workdir, "run_dir": r.run_dir,
            "env": r.env, "secrets": r.secrets, "code": r.code, "instance_info": r.instance_info,
            "hardware": r.hardware, "environment": r.environment, "artifacts": r.artifacts, "checkpoint": r.checkpoint,
            "children": [k for k in tl.children.get(r.id, []) if k in tl.runs],
            "notes": [{"user": n.user, "created_at": n.created_at, "text": n.text} for n in tl.notes(r.id)]}


def instance(i: Instance, uptime_seconds: float | None) -> dict[str, Any]:
    """An instance as ``labdeck ls --json`` lists it."""
    return {
        "name": i.name, "provider": i.provider, "provider_type": i.provider_type, "state": i.state, "host": i.host,
        "latency_ms": _number(i.latency_ms), "size": i.size, "spot": i.spot, "region": i.region, "vcpus": i.vcpus,
        "memory_mib": i.memory_mib, "gpus": i.gpus, "gpu_summary": i.gpu_summary, "price_per_hour": _number(i.price_per_hour),
        "price_source": i.price_source, "started_at": i.started_at, "uptime_seconds": uptime_seconds,
        "created_by": i.created_by, "managed": i.managed, "cost_usd": _number(i.cost), "autostop": i.autostop,
        "note": i.note,
    }


def deployment(d: Deployment) -> dict[str, Any]:
    """A deployment as ``labdeck models --json`` lists it."""
    return {"id": d.id, "name": d.name, "run_id": d.run_id, "user": d.user, "state": d.state,
            "state_reason": d.state_reason, "instance": d.instance, "port": d.port, "url": d.url, "model": d.model,
            "started_at": d.started_at, "stopped_at": d.stopped_at}


def size(s, provider: str, region: str) -> dict[str, Any]:
    """A size as ``labdeck sizes --json`` lists it (``s``: a :class:`backends.catalog.SizeInfo`)."""
    return {"id": s.id, "provider": provider, "provider_type": s.provider_type, "region": region, "gpus": s.gpus,
            "gpu": s.gpu, "gpu_summary": s.gpu_summary, "vcpus": s.vcpus, "ram_mib": s.ram_mib,
            "price_per_hour": _number(s.price_per_hour), "price_source": s.price_source}


def spend(sp, user: str, daily_budget: float, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``labdeck spend --json``: burn rates, today's spend, the budget, and the instances labdeck
    launched (every teammate's records, newest first; ``sp``: a :class:`backends.catalog.Spend`)."""
    return {
        "user": user, "burn_per_hour": round(sp.burn_user, 6), "today_usd": round(sp.today_user, 6),
        "daily_budget_usd": daily_budget or None, "team_burn_per_hour": round(sp.burn_team, 6),
        "team_today_usd": round(sp.today_team, 6),
        "instances": [{"id": r.get("id"), "name": r.get("name"), "owner": r.get("created_by"),
                       "provider": r.get("provider"), "state": r.get("state"), "created_at": r.get("created_at"),
                       "price_per_hour": _number(r.get("price_per_hour")),
                       "cost_usd": round(sp.cost_so_far.get(r.get("id", ""), 0.0), 6)} for r in records],
    }
