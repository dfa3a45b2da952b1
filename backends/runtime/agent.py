#!/usr/bin/env python3
"""labdeck's monitoring agent: one small process per user per instance, standard library first.

It samples the machine once a second and appends one JSON line per sample to
``<out>/samples.jsonl`` (``<out>`` is this host's own directory, ``~/.labdeck/agent/<host id>``:
a home shared by several hosts holds one agent per host; labdeck passes the id in with
``--host-id`` and each sample carries it as ``"host"``); labdeck reads that file from byte offsets over its SSH
connection (like run logs), so a dropped connection or a restarted labdeck loses
nothing and sees nothing twice. The agent itself owes nothing to the connection
(it runs detached) and stops by itself when nobody has read its samples for
``--idle-exit`` seconds (labdeck touches ``<out>/reader`` while it watches).

Each sample: time; CPU %; memory; load; disk of the runs directory; network
rates; per-GPU utilization, memory, temperature and power; GPU memory per
process, mapped to labdeck runs through the process environment
(``LABDECK_RUN_ID``, inherited by every process of a job) or its parents; CPU
and RSS per run.

GPUs come from nvitop when importable, else ``nvidia-smi``, else none (host
metrics only, no error noise: checked once). ``--gpu-source fake:FILE`` reads
devices and processes from a JSON file instead: the tests' stand-in for the
NVIDIA driver, at the outermost boundary only.

Stdlib only (plus nvitop when present); runs on Python 3.8+.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time

VERSION = "1"
ROTATE_BYTES = 64 << 20


def read_cpu_times():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals), idle


def read_meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            out[k] = int(rest.split()[0])
    total = out.get("MemTotal", 0) // 1024
    avail = out.get("MemAvailable", out.get("MemFree", 0)) // 1024
    return total - avail, total


def read_net():
    rx = tx = 0
    try:
        with open("/proc/net/dev") as f:
            for line in f.readlines()[2:]:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    continue
                fields = rest.split()
                rx += int(fields[0])
                tx += int(fields[8])
    except OSError:
        pass
    return rx, tx


CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    rest = data.rsplit(")", 1)[1].split()
    # fields after the comm: state(0) ppid(1) ... utime(11) stime(12) ... rss(21)
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[21]) * PAGE


def proc_run_id(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            env = f.read()
    except OSError:
        return None
    key = b"LABDECK_RUN_ID="
    i = env.find(key)
    if i < 0:
        return None
    j = env.find(b"\0", i)
    return env[i + len(key): j if j >= 0 else None].decode("ascii", "replace")


class GPUSource:
    """nvitop, nvidia-smi, a fake file, or nothing: decided once."""

    def __init__(self, spec):
        self.kind = "none"
        self.fake = None
        self.devices = []
        if spec.startswith("fake:"):
            self.kind, self.fake = "fake", spec[5:]
            return
        if spec in ("auto", "nvitop"):
            try:
                from nvitop import Device

                logging.getLogger("nvitop.api.libnvml").setLevel(logging.CRITICAL + 10)
                logging.getLogger("nvitop.api.libnvml").propagate = False
                Device.count()  # raises without a driver
                self.devices = Device.all()
                self.kind = "nvitop"
                return
            except Exception:
                pass
        if spec in ("auto", "nvidia-smi") and shutil.which("nvidia-smi"):
            try:
                subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=5, check=True)
                self.kind = "nvidia-smi"
            except Exception:
                self.kind = "none"

    def sample(self):
        """(gpus, procs): gpus [{index,name,util,mem_used,mem_total,temp,power}], procs [{pid,gpu,mem}]"""
        if self.kind == "fake":
            try:
                with open(self.fake) as f:
                    d = json.load(f)
                return d.get("gpus", []), d.get("procs", [])
            except (OSError, ValueError):
                return [], []
        if self.kind == "nvitop":
            gpus, procs = [], []
            for d in self.devices:
                try:
                    gpus.append({"index": d.index, "name": d.name(), "util": d.gpu_utilization(),
                                 "mem_used": d.memory_used() // (1 << 20), "mem_total": d.memory_total() // (1 << 20),
                                 "temp": d.temperature(), "power": round((d.power_usage() or 0) / 1000, 1)})
                    for pid, p in d.processes().items():
                        procs.append({"pid": pid, "gpu": d.index, "mem": (p.gpu_memory() or 0) // (1 << 20)})
                except Exception:
                    continue
            return gpus, procs
        if self.kind == "nvidia-smi":
            return self._smi()
        return [], []

    def _smi(self):
        gpus, procs = [], []
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=index,name,utilization.gpu,memory.used,memory.total,"
                                "temperature.gpu,power.draw,uuid", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=5).stdout
            uuid_index = {}
            for line in q.splitlines():
                f = [x.strip() for x in line.split(",")]
                if len(f) < 8:
                    continue
                num = lambda x: float(x) if x.replace(".", "", 1).isdigit() else 0.0  # noqa: E731
                gpus.append({"index": int(f[0]), "name": f[1], "util": num(f[2]), "mem_used": num(f[3]),
                             "mem_total": num(f[4]), "temp": num(f[5]), "power": num(f[6])})
                uuid_index[f[7]] = int(f[0])
            a = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=5).stdout
            for line in a.splitlines():
                f = [x.strip() for x in line.split(",")]
                if len(f) >= 3 and f[0].isdigit():
                    procs.append({"pid": int(f[0]), "gpu": uuid_index.get(f[2], -1),
                                  "mem": float(f[1]) if f[1].replace(".", "", 1).isdigit() else 0})
        except Exception:
            pass
        return gpus, procs


class Sampler:
    def __init__(self, gpu_source, disk_path):
        self.gpu = gpu_source
        self.disk_path = disk_path
        self.uid = os.getuid()
        self.prev_cpu = read_cpu_times()
        self.prev_net = read_net()
        self.prev_t = time.monotonic()
        self.prev_proc = {}  # pid -> cpu ticks
        self.run_of = {}  # pid -> run id or ""

    def _run_for(self, pid, parents):
        if pid in self.run_of:
            return self.run_of[pid]
        run = proc_run_id(pid)
        if run is None:  # not ours or no env: inherit from the parent chain
            seen = 0
            p = parents.get(pid)
            while run is None and p and seen < 32:
                run = self.run_of.get(p) or proc_run_id(p)
                p = parents.get(p)
                seen += 1
        self.run_of[pid] = run or ""
        return run or ""

    def sample(self):
        now = time.monotonic()
        dt = max(1e-3, now - self.prev_t)
        total, idle = read_cpu_times()
        dtot, didle = total - self.prev_cpu[0], idle - self.prev_cpu[1]
        cpu = 100.0 * (1 - didle / dtot) if dtot > 0 else 0.0
        rx, tx = read_net()
        mem_used, mem_total = read_meminfo()
        try:
            st = os.statvfs(self.disk_path)
            disk = {"used": (st.f_blocks - st.f_bfree) * st.f_frsize // (1 << 20), "total": st.f_blocks * st.f_frsize // (1 << 20)}
        except OSError:
            disk = None
        runs = {}
        parents = {}
        stats = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                if os.stat("/proc/%d" % pid).st_uid != self.uid:
                    continue
                ppid, ticks, rss = proc_stat(pid)
            except (OSError, IndexError, ValueError):
                continue
            parents[pid] = ppid
            stats[pid] = (ticks, rss)
        alive = set(stats)
        for pid in list(self.run_of):
            if pid not in alive:
                del self.run_of[pid]
        for pid, (ticks, rss) in stats.items():
            run = self._run_for(pid, parents)
            if not run:
                continue
            r = runs.setdefault(run, {"cpu": 0.0, "rss": 0, "procs": 0, "gpu_mem": 0, "gpus": []})
            prev = self.prev_proc.get(pid)
            if prev is not None:
                r["cpu"] += 100.0 * (ticks - prev) / CLK / dt
            r["rss"] += rss // (1 << 20)
            r["procs"] += 1
        self.prev_proc = {pid: s[0] for pid, s in stats.items()}
        gpus, gprocs = self.gpu.sample()
        for gp in gprocs:
            pid = int(gp.get("pid", -1))
            run = self.run_of.get(pid) or (self._run_for(pid, parents) if pid in stats else "")
            gp["run"] = run or None
            if run:
                r = runs.setdefault(run, {"cpu": 0.0, "rss": 0, "procs": 0, "gpu_mem": 0, "gpus": []})
                r["gpu_mem"] += gp.get("mem", 0)
                if gp.get("gpu") not in r["gpus"]:
                    r["gpus"].append(gp.get("gpu"))
        for r in runs.values():
            r["cpu"] = round(r["cpu"], 1)
        out = {"t": round(time.time(), 3), "cpu": round(cpu, 1), "ncpu": os.cpu_count(), "mem_used": mem_used,
               "mem_total": mem_total, "load1": round(os.getloadavg()[0], 2), "disk": disk,
               "net": {"rx": int((rx - self.prev_net[0]) / dt), "tx": int((tx - self.prev_net[1]) / dt)},
               "gpus": gpus, "gpu_procs": gprocs, "runs": runs, "gpu_source": self.gpu.kind}
        self.prev_cpu, self.prev_net, self.prev_t = (total, idle), (rx, tx), now
        return out


def self_cpu_seconds():
    t = os.times()
    return t.user + t.system


def main(argv=None):
    ap = argparse.ArgumentParser(description="labdeck monitoring agent")
    ap.add_argument("--out", required=True)
    ap.add_argument("--host-id", default="", help="the id labdeck gave this host (written into every sample)")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--gpu-source", default="auto")
    ap.add_argument("--disk-path", default=os.path.expanduser("~"))
    ap.add_argument("--idle-exit", type=float, default=600.0, help="stop when nobody read samples for this long")
    ap.add_argument("--samples", type=int, default=0, help="stop after this many samples (0: run until idle)")
    ap.add_argument("--version", action="store_true")
    args = ap.parse_args(argv)
    if args.version:
        print(VERSION)
        return 0
    os.makedirs(args.out, exist_ok=True)
    lock = open(os.path.join(args.out, "agent.lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another agent of this user runs here already
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    reader = os.path.join(args.out, "reader")
    if not os.path.exists(reader):
        open(reader, "a").close()
    path = os.path.join(args.out, "samples.jsonl")
    sampler = Sampler(GPUSource(args.gpu_source), args.disk_path)
    n = 0
    next_t = time.monotonic()
    while True:
        next_t += args.interval
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()
        try:
            s = sampler.sample()
            s["agent_cpu_s"] = round(self_cpu_seconds(), 3)
            if args.host_id:
                s["host"] = args.host_id
            line = (json.dumps(s, separators=(",", ":")) + "\n").encode()
            try:
                if os.path.getsize(path) > ROTATE_BYTES:
                    os.replace(path, path + ".1")
            except OSError:
                pass
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except Exception as e:  # one bad sample never stops the agent
            sys.stderr.write("labdeck agent: sample failed: %r\n" % (e,))
        n += 1
        if args.samples and n >= args.samples:
            return 0
        try:
            if time.time() - os.path.getmtime(reader) > args.idle_exit:
                return 0
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(main())
