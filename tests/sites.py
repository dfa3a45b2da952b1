"""Packages for the rig's node users: their Python (/usr/bin/python3, the same 3.11 ABI) cannot read
this interpreter's site-packages under /root (0700), so the distributions' files — with everything
they require — are copied into a directory everyone can read, used through PYTHONPATH."""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def build_site(names: list[str], *, follow_extras: bool = True) -> Path:
    """``follow_extras``: also the extras a requirement asks for, as pip installs them (False: only the base
    requirements, e.g. litserve without uvicorn[standard]'s uvloop and httptools)."""
    site = Path(tempfile.mkdtemp(prefix="ldrig-site-", dir="/tmp"))
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(n, frozenset()) for n in names]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, ",".join(sorted(extras))) in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add((key, ",".join(sorted(extras))))
        for req in dist.requires or []:  # extras asked for count too (litserve wants uvicorn[standard])
            r = Requirement(req)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((r.name, frozenset(r.extras) if follow_extras else frozenset()))
        for f in dist.files or []:
            if str(f).startswith(".."):
                continue  # scripts outside site-packages
            src = Path(dist.locate_file(f))
            if src.is_file():
                dst = site / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    for p in [site, *site.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return site
