"""Packages for the rig's node users: their Python (/usr/bin/python3, the same 3.11 ABI) cannot read
this interpreter's site-packages under /root (0700), so the distributions' files — with everything
they require — are copied into a directory everyone can read, used through PYTHONPATH."""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def build_site(names: list[str]) -> Path:
    site = Path(tempfile.mkdtemp(prefix="ldrig-site-", dir="/tmp"))
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
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
