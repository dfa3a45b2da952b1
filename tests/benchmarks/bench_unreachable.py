"""A host that goes away: how soon labdeck says so, and whether the other hosts notice (issue 15, item 2).

Everything runs on the SSH test rig (``tests/rig.py``): real OpenSSH sshd in network namespaces, a
jump host and two nodes reachable only through it. It needs root; without it the benchmark says
so and is skipped, unless ``LABDECK_REQUIRE_RIG=1`` (then that is a crash, as for the rig tests).

1. **Unreachable detection.** Two Workstations, both connected to node1 and node2 through the jump
   host: labdeck as it is now (keepalive every 1 s of silence, the 3rd unanswered one ends the
   connection) and, as the baseline in the same run, one whose pool has the keepalive settings
   labdeck had before (2 s × 3: the issue measured 7.7–8.6 s). Then a link is cut *silently*
   (packets vanish; nothing answers "no route"): (a) node2's link behind the live jump host, (b)
   the jump host's own link. Measured for each Workstation: seconds from the cut until its
   health map (:attr:`backends.workstation.Workstation.health`) shows the host unreachable (for
   (b): node1, behind the jump host, with the jump host named as the cause). Beside it, one healthy
   round trip to node2 (``transport.run("true")``, p50). Target: ≤ 3 s.
2. **node1's update rate while node2 is down.** A job on each node prints a line every 0.1 s. As
   the TUI does, every second a round of status reads starts (``Workstation.refresh_hosts``, not
   exclusive: a round still waiting for a slow host never holds up the next); counted: the rounds
   in which node1's run got a new last line, per second, for a window before node2's link is cut
   and a window while it is down. Target: during ≥ 0.8× before (anchor: the issue's 21 updates in
   30 s, in 6–8 s windows, with the refresh gathered over all hosts).

Run: ``python3 -m tests.benchmarks unreachable`` (``--quick``: one cut each, short windows).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from backends.config import load_config
from backends.paths import Paths
from backends.workstation import Workstation

from ._common import Verdict, console, finish, fmt_ms, new_table, scratch_dir, summarize, verdict, write_results

NAME = "unreachable"
TARGET_DETECT_S = 3.0
TARGET_RATE_RATIO = 0.8
OLD_KEEPALIVE = (2.0, 3)  # labdeck's keepalive before (interval s, count max)
CONNECT_TIMEOUT_S = 3.0
REFRESH_S = 1.0


def config_text(rig, home: Path) -> str:
    return rig.labdeck_config(policy=None, connect_timeout=CONNECT_TIMEOUT_S, node_settings="max_concurrent = 4\n",
                              extra=f'[store]\nteam_dir = "{home / "team"}"\n')


def open_ws(home: Path, rig, *, old: bool = False) -> Workstation:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(config_text(rig, home))
    ws = Workstation(load_config(Paths.resolve(home)))
    if old:
        pool = ws.providers["lab"].pool
        pool.keepalive_interval, pool.keepalive_count_max = OLD_KEEPALIVE
    return ws


def silence(rig, node) -> None:
    """Cut ``node`` off without a word (as bench_remote does): its end of the jump link down, and a
    permanent neighbour entry for it on the jump host, so packets leave into a link without carrier
    and vanish (no ARP failure, no ICMP)."""
    from tests.rig import _ip

    nif, jif = f"{rig.id}n{node.index}", f"{rig.id}j{node.index}"
    mac = json.loads(_ip("-j", "link", "show", nif, ns=node.ns).stdout)[0]["address"]
    node.link_down(both_ends=False)
    _ip("neigh", "replace", node.addr, "lladdr", mac, "nud", "permanent", "dev", jif, ns=rig.jump.ns)


def unsilence(rig, node) -> None:
    from tests.rig import _ip

    node.link_up()
    _ip("neigh", "del", node.addr, "dev", f"{rig.id}j{node.index}", ns=rig.jump.ns, check=False)


async def connected(ws: Workstation) -> None:
    await ws.list_instances()
    for name in ("node1", "node2"):
        t = await ws.transport(name)
        res = await t.run("true", timeout=30)
        assert res.exit_code == 0, res


async def when_down(wss: dict[str, Workstation], host: str, t_cut: list[float], timeout: float) -> dict[str, float | None]:
    """Seconds from the cut (``t_cut[0]``, set by the caller) until each Workstation shows ``host`` unreachable."""
    got: dict[str, float | None] = {k: None for k in wss}
    done = {k: asyncio.Event() for k in wss}

    def watcher(label: str, ws: Workstation):
        def cb(name: str) -> None:
            if name == host and got[label] is None and not ws.health.get(host).reachable and t_cut:
                got[label] = time.monotonic() - t_cut[0]
                done[label].set()
        return cb

    cbs = {k: watcher(k, ws) for k, ws in wss.items()}
    for k, ws in wss.items():
        ws.health.subscribe(cbs[k])
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        for k, ws in wss.items():
            ws.health.unsubscribe(cbs[k])
    return got


async def wait_reachable(wss: dict[str, Workstation], hosts: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ws in wss.values():  # a round of use makes a lost connection try again
            for h in hosts:
                try:
                    t = await ws.transport(h)
                    await asyncio.wait_for(t.run("true", timeout=5), 6)
                except Exception:  # noqa: BLE001 - still down: next try
                    pass
        if all(ws.health.get(h).reachable for ws in wss.values() for h in hosts):
            return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{hosts} did not come back within {timeout:g}s")


async def measure_detection(rig, wss: dict[str, Workstation], cuts: int) -> dict[str, Any]:
    out: dict[str, Any] = {"node_behind_jump": [], "jump_host": [], "reasons": {}}
    t = await wss["now"].transport("node2")
    rtt = []
    for _ in range(20):
        t0 = time.perf_counter()
        await t.run("true", timeout=10)
        rtt.append(time.perf_counter() - t0)
    out["round_trip"] = summarize(rtt)
    node2 = rig.host("node2")
    for _ in range(cuts):
        for ws in wss.values():
            await connected(ws)
        await asyncio.sleep(1.5)  # idle links: detection rests on keepalives alone
        t_cut: list[float] = []
        waiting = asyncio.ensure_future(when_down(wss, "node2", t_cut, 15))
        await asyncio.sleep(0)
        silence(rig, node2)
        t_cut.append(time.monotonic())
        got = await waiting
        out["node_behind_jump"].append(got)
        out["reasons"]["node2"] = wss["now"].health.get("node2").reason
        unsilence(rig, node2)
        await wait_reachable(wss, ["node1", "node2"])

        for ws in wss.values():
            await connected(ws)
        await asyncio.sleep(1.5)
        t_cut = []
        waiting = asyncio.ensure_future(when_down(wss, "node1", t_cut, 15))
        await asyncio.sleep(0)
        rig.link_down(both_ends=False)
        t_cut.append(time.monotonic())
        got = await waiting
        out["jump_host"].append(got)
        out["reasons"]["node1 (jump host cut)"] = wss["now"].health.get("node1").reason
        rig.link_up()
        await wait_reachable(wss, ["node1", "node2"])
    return out


TICKER = "import time\nfor i in range(100000):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)\n"


async def measure_rate(rig, ws: Workstation, root: Path, window: float) -> dict[str, Any]:
    d = root / "ticker"
    d.mkdir(exist_ok=True)
    (d / "ticker.py").write_text(TICKER)
    runs = {n: await ws.launch(f"{rig.python} ticker.py", instance=n, workdir=str(d)) for n in ("node1", "node2")}
    updates: list[float] = []
    rounds: set[asyncio.Task] = set()

    async def one_round() -> None:
        async for inst, changed in ws.refresh_hosts():
            if inst == "node1" and any(r.id == runs["node1"].id for r in changed):
                updates.append(time.monotonic())

    async def ticking(stop: asyncio.Event) -> None:
        while not stop.is_set():
            task = asyncio.ensure_future(one_round())
            rounds.add(task)
            task.add_done_callback(rounds.discard)
            try:
                await asyncio.wait_for(stop.wait(), REFRESH_S)
            except asyncio.TimeoutError:
                pass

    stop = asyncio.Event()
    ticker = asyncio.ensure_future(ticking(stop))
    node2 = rig.host("node2")
    try:
        await asyncio.sleep(2)  # first rounds (connections warm)
        t0 = time.monotonic()
        await asyncio.sleep(window)
        silence(rig, node2)
        t_cut = time.monotonic()
        await asyncio.sleep(window)
        t_end = time.monotonic()
    finally:
        stop.set()
        await ticker
        for task in list(rounds):
            task.cancel()
        unsilence(rig, node2)
    before = [u for u in updates if t0 <= u < t_cut]
    during = [u for u in updates if t_cut <= u < t_end]
    gaps = [b - a for a, b in zip(during, during[1:])]
    node2_state = ws.store.find_run(runs["node2"].id).state  # before the clean-up below cancels it
    for r in runs.values():
        try:
            await ws.cancel(r.id)
        except Exception:  # noqa: BLE001 - node2 may still be coming back; the rig is closed after
            pass
    return {"window_s": window, "before": len(before), "during": len(during),
            "before_per_s": len(before) / (t_cut - t0), "during_per_s": len(during) / (t_end - t_cut),
            "longest_gap_during_s": max(gaps) if gaps else None,
            "node2_state_after": node2_state}


async def run_all(rig, root: Path, quick: bool) -> dict[str, Any]:
    wss = {"now": open_ws(root / "now", rig), "old": open_ws(root / "old", rig, old=True)}
    try:
        det = await measure_detection(rig, wss, 1 if quick else 5)
    finally:
        await wss["old"].close()
    try:
        rate = await measure_rate(rig, wss["now"], root, 4.0 if quick else 15.0)
    finally:
        await wss["now"].close()
    return {"detection": det, "rate": rate}


def main(quick: bool = False) -> list[Verdict]:
    from tests.rig import Rig, RigUnavailable

    t_all = time.perf_counter()
    saved = os.environ.pop("LABDECK_TEAM_DIR", None)
    try:
        with scratch_dir("unreachable") as root:
            try:
                rig = Rig.build(2)
            except RigUnavailable as e:
                if os.environ.get("LABDECK_REQUIRE_RIG") == "1":
                    raise RuntimeError(f"the SSH rig is required (LABDECK_REQUIRE_RIG=1) but unavailable: {e}") from None
                console.print(f"[bold yellow]bench_unreachable skipped: the SSH rig is unavailable here ({e}).[/]\n")
                write_results(NAME, {"skipped": str(e)}, quick=quick)
                return [Verdict(NAME, "all", "skipped", str(e), None)]
            try:
                res = asyncio.run(run_all(rig, root, quick))
            finally:
                rig.close()
    finally:
        if saved is not None:
            os.environ["LABDECK_TEAM_DIR"] = saved
    elapsed = time.perf_counter() - t_all
    verdicts: list[Verdict] = []

    det = res["detection"]
    t1 = new_table(f"Link cut silently → host shown unreachable (seconds; {len(det['node_behind_jump'])} cut(s) each; "
                   f"target ≤ {TARGET_DETECT_S:g} s)",
                   ["Cut", "labdeck p50", "labdeck max", "old keepalive (2 s × 3) p50", "Reason shown", "Target"])
    for key, label, host in (("node_behind_jump", "node2's link (behind the live jump host)", "node2"),
                             ("jump_host", "the jump host's link (node1 behind it)", "node1 (jump host cut)")):
        now = [g["now"] for g in det[key] if g["now"] is not None]
        old = [g["old"] for g in det[key] if g["old"] is not None]
        missed = sum(1 for g in det[key] if g["now"] is None)
        p50 = statistics.median(now) if now else None
        worst = max(now) if now and not missed else None
        met = None if quick else (worst is not None and worst <= TARGET_DETECT_S)
        t1.add_row(label, f"{p50:.2f}" if p50 is not None else "[red]never[/]",
                   f"{worst:.2f}" if worst is not None else f"[red]{missed} never[/]",
                   f"{statistics.median(old):.2f}" if old else "never (15 s)", det["reasons"].get(host, ""), verdict(met))
        if not quick:
            verdicts.append(Verdict(NAME, f"unreachable after a cut: {label}",
                                    f"max {worst:.2f} s" if worst is not None else "missed",
                                    f"≤ {TARGET_DETECT_S:g} s", met))
    rt = det["round_trip"]
    t1.add_row("[dim]baseline: one healthy round trip to node2 (p50)[/]", f"[dim]{fmt_ms(rt['p50_ms'])} ms[/]", "", "", "", "")
    console.print(t1)

    r = res["rate"]
    ratio = r["during_per_s"] / r["before_per_s"] if r["before_per_s"] else 0.0
    t2 = new_table(f"node1's run: rounds with a new last line, per second (a round every {REFRESH_S:g} s, "
                   f"{r['window_s']:g} s windows; target: during ≥ {TARGET_RATE_RATIO:g}× before)",
                   ["Window", ("updates", "right"), ("per s", "right"), ("longest gap s", "right"), "Target"])
    t2.add_row("before node2's link is cut (baseline)", str(r["before"]), f"{r['before_per_s']:.2f}", "", "")
    met = None if quick else ratio >= TARGET_RATE_RATIO
    gap = r["longest_gap_during_s"]
    t2.add_row("while node2 is cut off", str(r["during"]), f"{r['during_per_s']:.2f} ({ratio:.2f}×)",
               f"{gap:.2f}" if gap is not None else "—", verdict(met))
    console.print(t2)
    console.print(f"[dim]node2's run at the end of its outage: {r['node2_state_after']} (a link that flapped loses no run)[/]")
    if not quick:
        verdicts.append(Verdict(NAME, "node1 updates/s while node2 is down", f"{ratio:.2f}× before",
                                f"≥ {TARGET_RATE_RATIO:g}×", met))
    return finish(NAME, {"quick": quick, **res}, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
