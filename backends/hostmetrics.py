"""One sample of this machine's hardware use: CPU, memory, load, and GPUs when a driver exists."""

from __future__ import annotations

import time
from typing import Any

from .gpu import mute_nvml_logger, probe_gpus


def sample() -> dict[str, Any]:
    """CPU % since the previous call, memory, load average and per-GPU use (empty without a driver)."""
    import psutil

    vm = psutil.virtual_memory()
    out: dict[str, Any] = {
        "t": time.time(),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "mem_used_mib": int((vm.total - vm.available) // (1 << 20)),
        "mem_total_mib": int(vm.total // (1 << 20)),
        "load1": psutil.getloadavg()[0],
        "gpus": [],
    }
    gpus, _note = probe_gpus()
    if gpus:
        from nvitop import Device

        mute_nvml_logger()
        for g in gpus:
            try:
                d = Device(g["index"])
                out["gpus"].append({
                    "index": g["index"], "util": d.gpu_utilization(), "mem_used_mib": d.memory_used() // (1 << 20),
                    "mem_total_mib": g["memory_total_mib"], "temp_c": d.temperature(), "power_w": (d.power_usage() or 0) / 1000,
                })
            except Exception:
                continue
    return out
