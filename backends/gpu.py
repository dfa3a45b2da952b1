"""GPU discovery through nvitop, checked once per process.

Without an NVIDIA driver, ``Device.count()`` raises NVMLError_LibraryNotFound
and every failing NVML call logs a multi-line CRITICAL on ``nvitop.api.libnvml``.
So: mute that logger, probe once, remember the answer.
"""

from __future__ import annotations

import functools
import logging
from typing import Any


def mute_nvml_logger() -> None:
    """nvitop sets up this logger when imported, so mute it after the import."""
    log = logging.getLogger("nvitop.api.libnvml")
    log.setLevel(logging.CRITICAL + 10)
    log.propagate = False


@functools.lru_cache(maxsize=1)
def probe_gpus() -> tuple[tuple[dict[str, Any], ...], str]:
    """(gpus, note): each gpu is {index, name, memory_total_mib}; note explains an empty list."""
    try:
        from nvitop import Device
    except Exception as e:  # nvitop missing or broken: host metrics only
        return (), f"nvitop unavailable ({type(e).__name__})"
    mute_nvml_logger()
    try:
        count = Device.count()
    except Exception:
        return (), "no NVIDIA driver"
    gpus = []
    for i in range(count):
        try:
            d = Device(i)
            gpus.append({"index": i, "name": str(d.name()), "memory_total_mib": int(d.memory_total() // (1 << 20))})
        except Exception:
            gpus.append({"index": i, "name": "NVIDIA GPU (unreadable)", "memory_total_mib": 0})
    return tuple(gpus), "" if gpus else "no NVIDIA GPU"
