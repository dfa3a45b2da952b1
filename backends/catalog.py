"""Sizes and prices: what a cloud size is (GPUs, vCPUs, RAM) and what an hour of it costs.

A size's price comes from, in order:

1. the provider's own API, where it states one (DigitalOcean's ``price_hourly``, Linode's
   ``price.hourly``) — ``source = "provider API"``;
2. libcloud's bundled pricing (offline), e.g. ``get_size_price('compute', 'ec2_linux',
   'g4dn.xlarge', region='us-east-1') → 0.526`` — ``source = "libcloud pricing"``;
3. the user's refreshed catalog (``<data dir>/catalog.json``, written by ``labdeck catalog
   --refresh`` from the providers' APIs), then the catalog shipped with labdeck
   (``backends/data/catalog.json``) — ``source = "catalog"``;
4. ``price_per_hour`` set for the size in the config — overrides everything (a negotiated rate).

GPU facts come from the API where it has them (Linode ``gpus``), libcloud's EC2 instance
table (``gpu`` count), the catalog, and the size name (``gpu-h100x8-…``, ``g5.…``).

Spend: :func:`spend` turns instance records (their running intervals) into cost so far, today's
spend and the burn rate; :func:`check_budget` applies the per-user daily budget.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from . import clock
from .errors import LabdeckError
from .models import parse_time

SHIPPED = Path(__file__).with_name("data") / "catalog.json"

# provider type -> libcloud pricing driver name (where libcloud bundles prices)
LIBCLOUD_PRICING = {"ec2": "ec2_linux"}


@dataclass
class SizeInfo:
    id: str
    provider_type: str
    gpus: int = 0
    gpu: str = ""  # model, e.g. "A100"
    vcpus: int = 0
    ram_mib: int = 0
    price_per_hour: float | None = None
    price_source: str = ""  # provider API | libcloud pricing | catalog | config | unknown
    regions: list[str] | None = None  # where the API says the size is offered (None: not stated)

    @property
    def gpu_summary(self) -> str:
        return f"{self.gpus}× {self.gpu or 'GPU'}" if self.gpus else "no GPU"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass
class Catalog:
    """The shipped catalog overlaid with the user's refreshed one."""

    data: dict[str, Any] = field(default_factory=dict)
    user_file: Path | None = None

    @classmethod
    def load(cls, user_file: Path | None = None) -> "Catalog":
        data = _load(SHIPPED)
        if user_file is not None and user_file.exists():
            for ptype, section in _load(user_file).items():
                if isinstance(section, dict):
                    merged = dict(data.get(ptype) or {})
                    merged["sizes"] = {**(merged.get("sizes") or {}), **(section.get("sizes") or {})}
                    data[ptype] = merged
        return cls(data, user_file)

    def entry(self, ptype: str, size: str) -> dict[str, Any]:
        return ((self.data.get(ptype) or {}).get("sizes") or {}).get(size) or {}

    def catalog_price(self, ptype: str, size: str, region: str) -> float | None:
        prices = self.entry(ptype, size).get("price") or {}
        value = prices.get(region, prices.get("*"))
        return float(value) if isinstance(value, (int, float)) else None

    def gpu_model(self, ptype: str, size: str) -> str:
        e = self.entry(ptype, size)
        if e.get("gpu"):
            return str(e["gpu"])
        fam = size.split(".")[0]
        return str(((self.data.get(ptype) or {}).get("gpu_families") or {}).get(fam, ""))

    def describe(self, ptype: str, size: str, region: str, *, api: dict[str, Any] | None = None,
                 override: float | None = None) -> SizeInfo:
        """Everything known about ``size``: ``api`` holds what the provider's size listing said
        (gpus, vcpus, ram_mib, price, regions), which wins over the catalog."""
        api = api or {}
        e = self.entry(ptype, size)
        info = SizeInfo(id=size, provider_type=ptype, regions=api.get("regions"))
        info.vcpus = int(api.get("vcpus") or e.get("vcpus") or 0)
        info.ram_mib = int(api.get("ram_mib") or (e.get("ram_gib", 0) * 1024) or 0)
        if ptype == "ec2" and not (info.vcpus and info.ram_mib):  # libcloud's offline table, as for GPUs
            vcpus, ram = ec2_shape(size)
            info.vcpus, info.ram_mib = info.vcpus or vcpus, info.ram_mib or ram
        gpus = api.get("gpus")
        if gpus is None:
            gpus = e.get("gpus")
        if gpus is None:
            gpus = _gpus_from_libcloud(ptype, size)
        if gpus is None:
            gpus = _gpus_from_name(size)
        info.gpus = int(gpus or 0)
        info.gpu = self.gpu_model(ptype, size) or (_gpu_from_name(size) if info.gpus else "")
        if override is not None:
            info.price_per_hour, info.price_source = float(override), "config"
        elif isinstance(api.get("price"), (int, float)) and api["price"] > 0:
            info.price_per_hour, info.price_source = float(api["price"]), "provider API"
        else:
            p = libcloud_price(ptype, size, region)
            if p is not None:
                info.price_per_hour, info.price_source = p, "libcloud pricing"
            else:
                p = self.catalog_price(ptype, size, region)
                info.price_per_hour, info.price_source = (p, "catalog") if p is not None else (None, "unknown")
        return info

    def write_user(self, ptype: str, sizes: Iterable[SizeInfo], region: str) -> Path:
        """Record ``sizes`` (as listed by a provider's API) in the user's catalog, atomically."""
        if self.user_file is None:
            raise LabdeckError("No user catalog file is configured.")
        current = _load(self.user_file)
        section = current.setdefault(ptype, {}).setdefault("sizes", {})
        for s in sizes:
            entry = section.get(s.id) or {}
            price = dict(entry.get("price") or {})
            if s.price_per_hour is not None:
                price[region or "*"] = s.price_per_hour
            section[s.id] = {"gpus": s.gpus, "gpu": s.gpu, "vcpus": s.vcpus, "ram_gib": round(s.ram_mib / 1024, 1),
                             "price": price}
        current["_refreshed_at"] = clock.now().isoformat(timespec="seconds")
        self.user_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.user_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(self.user_file)
        return self.user_file


def libcloud_price(ptype: str, size: str, region: str) -> float | None:
    driver = LIBCLOUD_PRICING.get(ptype)
    if not driver:
        return None
    try:
        from libcloud.pricing import get_size_price

        p = get_size_price("compute", driver, size, region=region or None)
    except Exception:  # libcloud raises KeyError and friends for sizes and regions it has no price for
        return None
    return float(p) if isinstance(p, (int, float)) and p > 0 else None


def _gpus_from_libcloud(ptype: str, size: str) -> int | None:
    if ptype != "ec2":
        return None
    try:
        from libcloud.compute.constants.ec2_instance_types import INSTANCE_TYPES
    except ImportError:
        return None
    gpu = ((INSTANCE_TYPES.get(size) or {}).get("extra") or {}).get("gpu")
    try:
        return int(gpu) if gpu not in (None, "", "NA") else None
    except (TypeError, ValueError):
        return None


def ec2_shape(size: str) -> tuple[int, int]:
    """(vcpus, ram MiB) of an EC2 size from libcloud's instance table, (0, 0) if unknown."""
    try:
        from libcloud.compute.constants.ec2_instance_types import INSTANCE_TYPES
    except ImportError:
        return 0, 0
    t = INSTANCE_TYPES.get(size) or {}
    try:
        return int((t.get("extra") or {}).get("vcpu") or 0), int(t.get("ram") or 0)
    except (TypeError, ValueError):
        return 0, 0


_GPU_NAME = re.compile(r"gpu-([a-z0-9]+?)x(\d+)", re.I)


def _gpus_from_name(size: str) -> int | None:
    m = _GPU_NAME.search(size)
    return int(m.group(2)) if m else None


def _gpu_from_name(size: str) -> str:
    m = _GPU_NAME.search(size)
    return m.group(1).upper() if m else ""


# ---- spend ----------------------------------------------------------------------------------

def intervals(rec: dict[str, Any], now: datetime) -> list[tuple[datetime, datetime]]:
    """The billed intervals of an instance record: closed ones plus the open one while running."""
    out = []
    for a, b in rec.get("billed", []) or []:
        ta, tb = parse_time(a), parse_time(b)
        if ta and tb and tb > ta:
            out.append((ta, tb))
    since = parse_time(rec.get("running_since"))
    if since is not None:
        out.append((since, max(since, now)))
    return out


def cost_between(rec: dict[str, Any], start: datetime, end: datetime, now: datetime) -> float:
    price = float(rec.get("price_per_hour") or 0.0)
    total = 0.0
    for a, b in intervals(rec, now):
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            total += (hi - lo).total_seconds() / 3600 * price
    return total


@dataclass
class Spend:
    burn_user: float = 0.0  # $/hr of this user's running instances
    burn_team: float = 0.0
    today_user: float = 0.0  # $ spent since 00:00 UTC by this user's instances
    today_team: float = 0.0
    cost_so_far: dict[str, float] = field(default_factory=dict)  # instance record id -> $ over its lifetime


def spend(records: Iterable[dict[str, Any]], user: str, now: datetime | None = None) -> Spend:
    """Burn rate and spend from instance records (every user's, as the team store holds them)."""
    now = now or clock.now()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    out = Spend()
    for rec in records:
        price = float(rec.get("price_per_hour") or 0.0)
        mine = rec.get("created_by") == user
        total = cost_between(rec, datetime.min.replace(tzinfo=timezone.utc), now, now)
        today = cost_between(rec, day, now, now)
        out.cost_so_far[rec.get("id", "")] = total
        out.today_team += today
        if rec.get("running_since"):
            out.burn_team += price
            if mine:
                out.burn_user += price
        if mine:
            out.today_user += today
    return out


@dataclass
class BudgetCheck:
    ok: bool
    warn: bool
    message: str


def check_budget(sp: Spend, daily: float, new_price: float, warn_fraction: float = 0.8,
                 horizon_hours: float = 1.0) -> BudgetCheck:
    """A launch adding ``new_price`` $/hr, against the user's daily budget (0 = none).

    Projected = spent today + (current burn + new price) × ``horizon_hours``: the launch is
    refused when that exceeds the budget, warned about above ``warn_fraction`` of it."""
    if daily <= 0:
        return BudgetCheck(True, False, "")
    projected = sp.today_user + (sp.burn_user + new_price) * horizon_hours
    text = (f"today ${sp.today_user:.2f} spent, burning ${sp.burn_user:.2f}/h; with this instance "
            f"${projected:.2f} within {horizon_hours:g}h, of a ${daily:.2f} daily budget")
    if projected > daily:
        return BudgetCheck(False, True, "Over budget: " + text + ".")
    if projected > daily * warn_fraction:
        return BudgetCheck(True, True, "Near budget: " + text + ".")
    return BudgetCheck(True, False, text)


def close_interval(rec: dict[str, Any], at: str) -> dict[str, Any]:
    """The record with its open running interval closed at ``at`` (ISO time)."""
    since = rec.get("running_since")
    if since:
        end = max(parse_time(at), parse_time(since)).isoformat(timespec="milliseconds").replace("+00:00", "Z")  # type: ignore
        rec = {**rec, "billed": [*(rec.get("billed") or []), [since, end]], "running_since": None}
    return rec


def hours_ago(hours: float, now: datetime | None = None) -> str:
    now = now or clock.now()
    return (now - timedelta(hours=hours)).isoformat().replace("+00:00", "Z")
