"""DigitalOcean, Linode and OpenStack through libcloud's real drivers, against local servers that
answer those APIs' recorded shapes (tests/cloudfakes.py), with the SSH rig's nodes standing in for
the VMs: the whole lifecycle, and the error paths (credentials, quota, a size the region does not
offer, no answer, a launch that fails half-way) with nothing left at the provider."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from backends import autostop, clouds
from backends.config import load_config
from backends.errors import ProviderError
from backends.paths import Paths
from backends.workstation import Workstation
from tests.cloudfakes import FakeDigitalOcean, FakeLinode, FakeOpenStack
from tests.conftest import provider_toml, wait_final

KINDS = {
    # kind: (fake class, provider options, GPU size, its summary, its $/hr, where the price comes from)
    "digitalocean": (FakeDigitalOcean, {"region": "nyc2", "image": "gpu-h100x1-base"}, "gpu-h100x1-80gb", "1× H100",
                     3.39, "provider API"),
    "linode": (FakeLinode, {"region": "us-east"}, "g1-gpu-rtx6000-1", "1× RTX 6000", 1.5, "provider API"),
    "openstack": (FakeOpenStack, {"region": "RegionOne", "image": "Ubuntu 22.04"}, "g1.a100.1", "1× A100", 2.2,
                  "catalog"),
}


def credentials(monkeypatch, kind: str, fake, token: str | None = None) -> None:
    token = token or fake.token
    if kind == "digitalocean":
        monkeypatch.setenv("DIGITALOCEAN_TOKEN", token)
    elif kind == "linode":
        monkeypatch.setenv("LINODE_TOKEN", token)
    else:
        monkeypatch.setenv("OS_AUTH_URL", f"{fake.url}/identity")
        monkeypatch.setenv("OS_USERNAME", fake.username)
        monkeypatch.setenv("OS_PASSWORD", token)
        monkeypatch.setenv("OS_PROJECT_NAME", fake.project)


def make_ws(home: Path, kind: str, fake, *, rig=None, key: Path | None = None, extra_toml: str = "",
            **opts) -> Workstation:
    values: dict = {"type": kind, "poll_seconds": 0.1, "api_timeout": 5, "ssh_timeout": 20, "connect_timeout": 3,
                    **KINDS[kind][1]}
    if kind != "openstack":
        values["endpoint"] = fake.url
    if rig is not None:
        cfg = home / "ssh_config"
        cfg.write_text(f"Host jump\n    HostName {rig.jump.addr}\n    User {rig.jump.user}\n    IdentityFile {rig.client_key}\n\n"
                       f"Host gpu1\n    User {rig.host('node1').user}\n")
        values.update(ssh_key=str(rig.client_key), ssh_user="", jump=["jump"], ssh_config=str(cfg))
    elif key is not None:
        values["ssh_key"] = str(key)
    values.update(opts)
    (home / "config.toml").write_text(provider_toml(kind, values) + extra_toml)
    return Workstation(load_config(Paths.resolve(home)))



def leftovers(fake) -> dict:
    """What labdeck made that is still at the provider."""
    nodes = {k: v for k, v in fake.nodes.items()}
    fws = {k: v for k, v in fake.firewalls.items()
           if "labdeck" in json.dumps(v) and (not isinstance(v, dict) or v.get("name") != "default")}
    keys = {k: v for k, v in fake.keys.items() if "labdeck" in json.dumps(v)}
    return {"nodes": nodes, "firewalls": fws, "keys": keys}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_lifecycle_on_the_rig(kind, home, fresh_rig, monkeypatch, tmp_path) -> None:
    rig = fresh_rig
    cls, _, size, gpus, price, source = KINDS[kind]
    with cls(ip_pool=(rig.host("node1").addr,), boot_polls=2) as fake:
        credentials(monkeypatch, kind, fake)
        # one of them with no GPU reading: autostop keeps that through later changes
        gpu_source = "none" if kind == "linode" else "nvidia-smi"
        ws = make_ws(home, kind, fake, rig=rig, extra_toml='[monitor]\ngpu_source = "none"\n' if kind == "linode" else "")
        stages: list[str] = []
        on_loop: list[bool] = []  # every libcloud call runs in the API thread, never on the event loop
        if kind == "openstack":  # (its flavor names: nova lists servers by flavor id)
            import threading

            from libcloud.compute.drivers.openstack import OpenStack_2_NodeDriver

            list_sizes = OpenStack_2_NodeDriver.list_sizes

            def watched(self, *a, **kw):
                on_loop.append(threading.current_thread() is threading.main_thread())
                return list_sizes(self, *a, **kw)

            monkeypatch.setattr(OpenStack_2_NodeDriver, "list_sizes", watched)
        try:
            sizes = {s.id: s for s in await ws.providers[kind].sizes()}
            assert sizes[size].gpu_summary == gpus and sizes[size].price_per_hour == pytest.approx(price)
            assert sizes[size].price_source == source

            inst = await clouds.up(ws, kind, "gpu1", size=size, autostop_minutes=20,
                                   progress=lambda s, d: stages.append(s))
            assert "provisioning" in stages and stages.index("ssh") < stages.index("bootstrap") < stages.index("ready")
            assert inst.host == rig.host("node1").addr

            listing = await ws.list_instances()
            gpu1 = next(i for i in listing.instances if i.name == "gpu1")
            assert gpu1.managed and gpu1.created_by == ws.user and gpu1.gpu_summary == gpus
            assert gpu1.size == size and not any(on_loop)
            assert gpu1.price_per_hour == pytest.approx(price)
            # a firewall that lets only SSH in, from the jump host
            (fw,) = leftovers(fake)["firewalls"].values()
            text = json.dumps(fw)
            assert f"{rig.jump.addr}/32" in text and ('"22"' in text or '"port_range_min": 22' in text)
            # ... and it covers this instance (not just exists)
            node = fake.nodes[str(inst.cloud_id)]
            if kind == "digitalocean":
                assert set(fw["tags"]) & set(node["tags"]) or str(node["id"]) in map(str, fw["droplet_ids"])
            elif kind == "linode":
                assert int(node["id"]) in [e["id"] for e in fw["entities"]]
            else:
                assert {"name": fw["name"]} in node["security_groups"]

            transport = await ws.transport("gpu1")
            state = await autostop.read_state(transport)
            assert state is None or state.get("idle_minutes") == 20 or state.get("starting")
            # changed after launch: off, then 15 minutes (on the instance and in the record)
            await clouds.set_autostop(ws, "gpu1", 0)
            for _ in range(40):
                state = await autostop.read_state(transport)
                if state and state.get("enabled") is False:
                    break
                await asyncio.sleep(0.1)
            assert state and state["enabled"] is False and autostop.countdown(state) == "off"
            state = await clouds.set_autostop(ws, "gpu1", 15)
            assert clouds.my_record(ws, "gpu1")["autostop_minutes"] == 15
            for _ in range(40):
                state = await autostop.read_state(transport)
                if state and state.get("enabled") and state.get("idle_minutes") == 15:
                    break
                await asyncio.sleep(0.1)
            assert state["enabled"] and state["idle_minutes"] == 15
            conf = await transport.read_file(f"{await autostop.autostop_dir(transport)}/config.json")
            assert json.loads(conf.data)["gpu_source"] == gpu_source
            proj = tmp_path / "proj"
            proj.mkdir()
            (proj / "hi.py").write_text("print('hi from', __import__('socket').gethostname())\n")
            run = await ws.launch(f"{rig.python} hi.py", instance="gpu1", workdir=str(proj))
            run = await wait_final(ws, run.id, timeout=10)
            assert run.state == "succeeded" and run.instance_info["provider_type"] == kind

            await clouds.stop(ws, "gpu1")
            listing = await ws.list_instances()
            assert next(i for i in listing.instances if i.name == "gpu1").state == "stopped"
            assert not listing.events
            await clouds.start(ws, "gpu1")
            listing = await ws.list_instances()
            assert next(i for i in listing.instances if i.name == "gpu1").state in ("running", "pending")
            await clouds.terminate(ws, "gpu1")
            left = leftovers(fake)
            assert left["nodes"] == {} and left["firewalls"] == {}
            rec = next(r for r in clouds.records(ws, team=False) if r["name"] == "gpu1")
            # DigitalOcean and Linode bill a powered-off machine: the meter ran from launch to terminate
            assert rec["state"] == "terminated" and len(rec["billed"]) == (1 if kind in ("digitalocean", "linode") else 2)
        finally:
            await ws.close()


@pytest.mark.parametrize("kind", list(KINDS))
async def test_error_paths(kind, home, monkeypatch, keypair) -> None:
    cls, _, size, *_ = KINDS[kind]
    with cls(ip_pool=("198.18.255.254",)) as fake:
        # bad credentials
        credentials(monkeypatch, kind, fake, token="wrong-token")
        ws = make_ws(home, kind, fake, key=keypair)
        try:
            listing = await ws.list_instances()
            assert "credentials were refused" in listing.errors[kind], listing.errors
        finally:
            await ws.close()

        credentials(monkeypatch, kind, fake)
        ws = make_ws(home, kind, fake, key=keypair, ssh_timeout=1.0, connect_timeout=0.4)
        try:
            # quota
            fake.fail_next("create_node", "quota")
            with pytest.raises(ProviderError, match="over the account's quota"):
                await clouds.up(ws, kind, "gpu1", size=size)
            assert leftovers(fake) == {"nodes": {}, "firewalls": {}, "keys": {}}

            # a size the region does not offer
            if kind == "digitalocean":
                with pytest.raises(ProviderError, match="not offered in region sfo3"):
                    ws.providers[kind].region = ws.providers[kind].api.region = "sfo3"
                    await clouds.up(ws, kind, "gpu2", size=size)
                ws.providers[kind].region = ws.providers[kind].api.region = "nyc2"
            elif kind == "linode":
                ws.providers[kind].region = ws.providers[kind].api.region = "eu-west"
                with pytest.raises(ProviderError, match="not available there"):
                    await clouds.up(ws, kind, "gpu2", size=size)
                ws.providers[kind].region = ws.providers[kind].api.region = "us-east"
            else:
                fake.sold_out.add(size)  # nova accepts it, then the server goes to ERROR: no valid host
                with pytest.raises(ProviderError, match="not available there"):
                    await clouds.up(ws, kind, "gpu2", size=size)
                fake.sold_out.clear()
            assert leftovers(fake) == {"nodes": {}, "firewalls": {}, "keys": {}}
            with pytest.raises(ProviderError, match="is not offered"):
                await clouds.up(ws, kind, "gpu2", size="no-such-size")

            # half-finished: the instance runs, SSH never answers → everything it made is deleted
            with pytest.raises(ProviderError, match="no SSH on gpu3") as err:
                await clouds.up(ws, kind, "gpu3", size=size)
            assert "Cleaned up" in str(err.value)
            assert leftovers(fake) == {"nodes": {}, "firewalls": {}, "keys": {}}
            assert all(r["state"] == "failed" for r in clouds.records(ws, team=False))

            # the API does not answer
            fake.delay = 2.0
            ws.providers[kind].options["api_timeout"] = 0.5
            t0 = time.monotonic()
            listing = await ws.list_instances()
            assert time.monotonic() - t0 < 1.8
            assert "did not answer" in listing.errors[kind]
            fake.delay = 0
        finally:
            await ws.close()


async def test_preempted_droplet_turns_its_runs_preempted(home, fresh_rig, monkeypatch, tmp_path) -> None:
    """The provider removes an instance (not labdeck, not autostop): its runs become ``preempted``."""
    rig = fresh_rig
    with FakeDigitalOcean(ip_pool=(rig.host("node1").addr,)) as fake:
        credentials(monkeypatch, "digitalocean", fake)
        ws = make_ws(home, "digitalocean", fake, rig=rig, autostop_minutes=0)
        try:
            inst = await clouds.up(ws, "digitalocean", "gpu1", size="gpu-h100x1-80gb")
            proj = tmp_path / "p"
            proj.mkdir()
            run = await ws.launch("sleep 30", instance="gpu1", workdir=str(proj))
            queued = await ws.launch("sleep 30", instance="gpu1", workdir=str(proj))  # one slot: it waits
            assert ws.store.find_run(queued.id).state == "queued"
            fake.remove_node(inst.cloud_id)
            listing = await ws.list_instances()
            assert any("gpu1" in e and "taken by the provider" in e for e in listing.events)
            assert any("2 run(s) preempted" in e for e in listing.events)
            run = ws.store.find_run(run.id)
            assert run.state == "preempted" and ws.store.find_run(queued.id).state == "preempted"
            rec = next(r for r in clouds.records(ws, team=False) if r["name"] == "gpu1")
            assert rec["state"] == "preempted" and rec["running_since"] is None
        finally:
            await ws.close()


async def test_a_slow_provider_never_holds_back_the_others(home, monkeypatch, keypair) -> None:
    """Each provider's instances are handed out as it answers; one that has not answered yet keeps
    what it showed last time (rows never vanish and come back under a cursor)."""
    from libcloud.compute.base import NodeImage, NodeLocation, NodeSize

    with FakeDigitalOcean(ip_pool=("127.0.0.1",), boot_polls=0) as do, FakeLinode(ip_pool=("127.0.0.1",), boot_polls=0) as li:
        credentials(monkeypatch, "digitalocean", do)
        credentials(monkeypatch, "linode", li)
        d = do.driver()
        d.create_node("do-a", NodeSize("c-8", "c-8", 0, 0, 0, 0, d), NodeImage("ubuntu-22-04-x64", "", d),
                      NodeLocation("nyc2", "", None, d))
        ld = li.driver()
        ld.create_node(NodeLocation("us-east", "", None, ld), "li-a", NodeSize("g6-nanode-1", "", 0, 0, 0, 0, ld),
                       NodeImage("linode/debian12", "", ld), root_pass="A-long-pass-123!")
        (home / "config.toml").write_text(
            f'[providers.do]\ntype = "digitalocean"\nendpoint = "{do.url}"\nregion = "nyc2"\nssh_key = "{keypair}"\n'
            f'[providers.li]\ntype = "linode"\nendpoint = "{li.url}"\nssh_key = "{keypair}"\n')
        ws = Workstation(load_config(Paths.resolve(home)))
        try:
            await ws.list_instances()  # warm: drivers made, sizes read
            do.delay = 1.5
            seen: list[tuple[float, set[str]]] = []
            t0 = time.monotonic()
            listing = await ws.list_instances(on_partial=lambda part: seen.append(
                (time.monotonic() - t0, {i.name for i in part.instances})))
            assert {i.name for i in listing.instances} == {"local", "do-a", "li-a"}
            first = seen[0]
            assert first[0] < 1.0 and "li-a" in first[1] and "local" in first[1]
            assert "do-a" in first[1]  # not answered yet: last time's row stays
            assert all(names == {"local", "do-a", "li-a"} for _, names in seen)
            assert seen[-1][0] >= 1.4
        finally:
            await ws.close()


async def test_autostop_terminate_on_a_provider_that_bills_stopped_machines(home, fresh_rig, monkeypatch) -> None:
    """The VM can only power itself off; labdeck, the next time it looks, terminates it."""
    rig = fresh_rig
    with FakeLinode(ip_pool=(rig.host("node1").addr,)) as fake:
        credentials(monkeypatch, "linode", fake)
        ws = make_ws(home, "linode", fake, rig=rig)
        try:
            inst = await clouds.up(ws, "linode", "gpu1", size="g1-gpu-rtx6000-1", autostop_minutes=5,
                                   autostop_action="terminate")
            # the daemon fired and powered the machine off (what `shutdown -h now` does to a Linode)
            fired = clouds.utcnow()
            ws.autostop_states["gpu1"] = (time.monotonic(), {"fired_at": fired, "action": "terminate"})
            fake.set_state(inst.cloud_id, "stopped")
            listing = await ws.list_instances()
            assert any("terminated by labdeck" in e for e in listing.events), listing.events
            assert fake.nodes == {}
            rec = next(r for r in clouds.records(ws, team=False) if r["name"] == "gpu1")
            assert rec["state"] == "terminated" and rec["running_since"] is None
            from backends.models import parse_time

            assert parse_time(rec["billed"][-1][1]) == parse_time(fired)  # billed until it went off, not beyond
        finally:
            await ws.close()


async def test_a_listing_during_labdecks_own_terminate_is_not_a_preemption(home, fresh_rig, monkeypatch, tmp_path) -> None:
    rig = fresh_rig
    with FakeDigitalOcean(ip_pool=(rig.host("node1").addr,)) as fake:
        credentials(monkeypatch, "digitalocean", fake)
        ws = make_ws(home, "digitalocean", fake, rig=rig, autostop_minutes=0, spot_relaunch=True)
        try:
            inst = await clouds.up(ws, "digitalocean", "gpu1", size="gpu-h100x1-80gb")
            run = await ws.launch("sleep 30", instance="gpu1", workdir=str(tmp_path))
            rec = clouds.my_record(ws, "gpu1")
            clouds._want(ws, rec, "terminated")  # what terminate() writes before it asks the provider
            fake.remove_node(inst.cloud_id)  # ... and the provider is done before labdeck's call returns
            listing = await ws.list_instances()
            assert not any("taken by the provider" in e for e in listing.events), listing.events
            assert ws.store.find_run(run.id).state != "preempted"
            rec = next(r for r in clouds.records(ws, team=False) if r["name"] == "gpu1")
            assert rec["state"] == "terminated" and rec["running_since"] is None and "relaunch" not in rec
            assert not ws.relaunching
        finally:
            await ws.close()


async def test_a_powered_off_machine_is_not_taken_by_the_provider(home, fresh_rig, monkeypatch) -> None:
    """These providers never stop a machine: off while labdeck wanted it running means the VM shut
    itself down. With autostop=terminate (and labdeck closed when it fired) labdeck finishes the job;
    with no autostop it is someone's poweroff: recorded as stopped, not a preemption."""
    rig = fresh_rig
    with FakeLinode(ip_pool=(rig.host("node1").addr,)) as fake:
        credentials(monkeypatch, "linode", fake)
        ws = make_ws(home, "linode", fake, rig=rig)
        try:
            inst = await clouds.up(ws, "linode", "gpu1", size="g1-gpu-rtx6000-1", autostop_minutes=5,
                                   autostop_action="terminate")
            ws.autostop_states.clear()  # nothing seen from the daemon
            fake.set_state(inst.cloud_id, "stopped")
            listing = await ws.list_instances()
            assert any("terminated by labdeck" in e for e in listing.events), listing.events
            assert fake.nodes == {}
        finally:
            await ws.close()
    with FakeDigitalOcean(ip_pool=(rig.host("node1").addr,)) as fake:
        credentials(monkeypatch, "digitalocean", fake)
        ws = make_ws(home, "digitalocean", fake, rig=rig, autostop_minutes=0)
        try:
            inst = await clouds.up(ws, "digitalocean", "gpu1", size="gpu-h100x1-80gb")
            fake.set_state(inst.cloud_id, "stopped")
            listing = await ws.list_instances()
            assert any("shut down from inside" in e for e in listing.events), listing.events
            assert not any("taken by the provider" in e for e in listing.events)
            rec = next(r for r in clouds.records(ws, team=False) if r["provider_type"] == "digitalocean")
            assert rec["state"] == "stopped" and rec["desired"] == "stopped"
        finally:
            await ws.close()


async def test_only_the_tui_and_ls_start_a_pending_relaunch(home, monkeypatch) -> None:
    """A relaunch left pending (labdeck closed before it was done) is started again by a listing only
    where it can finish; a one-shot command that lists instances (show, stop, autostop…) would cancel
    it half-way on exit, so it leaves it for the TUI or `labdeck ls`."""
    with FakeDigitalOcean() as fake:
        credentials(monkeypatch, "digitalocean", fake)
        for starts in (False, True):
            ws = make_ws(home, "digitalocean", fake)
            ws.starts_relaunches = starts
            ws.store.mine.put(clouds.TABLE, "rec1", {"id": "rec1", "name": "gpu1", "provider": "digitalocean",
                                                     "provider_type": "digitalocean", "state": "preempted",
                                                     "relaunch": "pending", "relaunch_runs": [], "created_by": ws.user})
            try:
                listing = await ws.list_instances()
                assert listing.errors == {} and ("rec1" in ws.relaunching) is starts
            finally:
                await ws.close()
