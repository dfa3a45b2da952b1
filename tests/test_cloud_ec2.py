"""EC2 through libcloud's real driver against a real moto server (tests/ec2shim.py), with the SSH
test rig's nodes standing in for the VMs: launch → SSH → bootstrap → a job → stop/start/terminate,
the error paths (credentials, quota, region, timeout, a launch that never gets SSH), the budget,
instances made outside labdeck, and spot preemption with a relaunch from the last checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from backends import autostop, clouds
from backends.config import load_config
from backends.errors import LabdeckError, ProviderError
from backends.paths import Paths
from backends.workstation import Workstation
from tests.conftest import provider_toml, wait_final
from tests.ec2shim import EC2Shim

AMI = "ami-1e749f67"  # one of moto's built-in images (an Ubuntu AMI)


@pytest.fixture
def shim():
    s = EC2Shim().start()
    try:
        yield s
    finally:
        s.close()


def ssh_config(home: Path, rig, names: dict[str, str]) -> Path:
    """The jump host, and each cloud instance name → the rig node user standing in for it."""
    text = (f"Host jump\n    HostName {rig.jump.addr}\n    User {rig.jump.user}\n    IdentityFile {rig.client_key}\n\n")
    for inst, node in names.items():
        text += f"Host {inst}\n    User {rig.host(node).user}\n\n"
    p = home / "ssh_config"
    p.write_text(text)
    return p


def cloud_config(home: Path, shim: EC2Shim, *, rig=None, names: dict[str, str] | None = None,
                 key: Path | None = None, budget: float = 0.0, **opts) -> Workstation:
    """A config with one EC2 provider `aws` on the shim; ``opts`` override its keys."""
    values: dict = {"type": "ec2", "endpoint": shim.url, "image": AMI, "poll_seconds": 0.2, "api_timeout": 5,
                    "ssh_timeout": 20, "connect_timeout": 3}
    if rig is not None:
        values.update(ssh_key=str(rig.client_key), ssh_user="", jump=["jump"],
                      ssh_config=str(ssh_config(home, rig, names or {"gpu1": "node1"})))
    elif key is not None:
        values["ssh_key"] = str(key)
    values.update(opts)
    text = provider_toml("aws", values)
    if budget:
        text += f"[budget]\ndaily_usd = {budget}\n"
    (home / "config.toml").write_text(text)
    return Workstation(load_config(Paths.resolve(home)))


def ec2_instances(shim: EC2Shim) -> dict[str, str]:
    out = {}
    for r in shim.boto3().describe_instances()["Reservations"]:
        for i in r["Instances"]:
            out[i["InstanceId"]] = i["State"]["Name"]
    return out


def labdeck_groups(shim: EC2Shim) -> list[dict]:
    return [g for g in shim.boto3().describe_security_groups()["SecurityGroups"] if g["GroupName"].startswith("labdeck-")]



# ---- the whole lifecycle on the rig -------------------------------------------------------------

async def test_launch_bootstrap_job_stop_start_terminate(home, fresh_rig, aws_env, tmp_path) -> None:
    rig = fresh_rig
    with EC2Shim((rig.host("node1").addr,)) as shim:
        ws = cloud_config(home, shim, rig=rig)
        stages: list[tuple[str, str]] = []
        try:
            inst = await clouds.up(ws, "aws", "gpu1", size="g4dn.xlarge", autostop_minutes=30,
                                   progress=lambda s, d: stages.append((s, d)))
            order = [s for s, _ in stages]
            for a, b in [("key", "firewall"), ("firewall", "creating"), ("creating", "ssh"), ("ssh", "bootstrap"),
                         ("bootstrap", "ready")]:
                assert order.index(a) < order.index(b), order
            assert inst.host == rig.host("node1").addr and inst.managed and inst.spot is False

            # at the provider: tagged, a key imported, a group open only for SSH from the jump host
            listing = await ws.list_instances()
            gpu1 = next(i for i in listing.instances if i.name == "gpu1")
            assert gpu1.state == "running" and gpu1.tags["labdeck-owner"] == ws.user and gpu1.labdeck_id
            assert gpu1.price_per_hour == pytest.approx(0.526) and gpu1.price_source == "libcloud pricing"
            assert gpu1.gpu_summary == "1× T4" and gpu1.vcpus == 4
            (group,) = labdeck_groups(shim)
            (described,) = [i for r in shim.boto3().describe_instances()["Reservations"] for i in r["Instances"]]
            assert [g["GroupId"] for g in described["SecurityGroups"]] == [group["GroupId"]]  # it covers the instance
            perms = group["IpPermissions"]
            assert [(p["FromPort"], p["ToPort"]) for p in perms] == [(22, 22)]
            assert [r["CidrIp"] for r in perms[0]["IpRanges"]] == [f"{rig.jump.addr}/32"]
            keys = shim.boto3().describe_key_pairs()["KeyPairs"]
            assert [k["KeyName"] for k in keys] == [f"labdeck-{ws.user}-" + keys[0]["KeyName"].rsplit("-", 1)[1]]

            # bootstrap: agent and autostop running on the instance
            transport = await ws.transport("gpu1")
            state = None
            for _ in range(50):
                state = await autostop.read_state(transport)
                if state:
                    break
                await asyncio.sleep(0.2)
            assert state and state["enabled"] and state["idle_minutes"] == 30
            res = await transport.run("cat ~/.labdeck/runs/.agent/version 2>/dev/null || ls ~/.labdeck/runs", timeout=10)
            assert res.ok

            # a job runs on it like on any other instance
            proj = tmp_path / "proj"
            proj.mkdir()
            (proj / "hello.py").write_text("print('hello from the cloud')\n")
            run = await ws.launch(f"{rig.python} hello.py", instance="gpu1", workdir=str(proj))
            run = await wait_final(ws, run.id, timeout=10)
            assert run.state == "succeeded"
            assert run.instance_info["provider_type"] == "ec2" and run.price_per_hour == pytest.approx(0.526)

            # the record bills from creation; stop closes the interval
            rec = clouds.my_record(ws, "gpu1")
            assert rec["running_since"] and rec["state"] == "running"
            stopped = await clouds.stop(ws, "gpu1")
            assert stopped.state in ("stopped", "stopping")
            rec = clouds.my_record(ws, "gpu1")
            assert rec["running_since"] is None and len(rec["billed"]) == 1 and rec["desired"] == "stopped"
            listing = await ws.list_instances()
            assert next(i for i in listing.instances if i.name == "gpu1").state == "stopped"
            assert not listing.events  # stopped by labdeck: not a preemption
            with pytest.raises(LabdeckError, match="stopped: there is nothing to connect to"):
                await ws.transport("gpu1")

            started = await clouds.start(ws, "gpu1")
            assert started.state == "running"
            assert clouds.my_record(ws, "gpu1")["running_since"]

            # a new labdeck process (nothing remembered in memory) terminates it and finds its firewall
            await ws.close()
            ws = cloud_config(home, shim, rig=rig)
            await ws.list_instances()
            await clouds.terminate(ws, "gpu1")
            assert set(ec2_instances(shim).values()) == {"terminated"}
            assert labdeck_groups(shim) == []  # its firewall went with it
            rec = next(r for r in clouds.records(ws, team=False) if r["name"] == "gpu1")
            assert rec["state"] == "terminated" and rec["running_since"] is None and len(rec["billed"]) == 2
            listing = await ws.list_instances()
            assert "gpu1" not in {i.name for i in listing.instances}
            sp = clouds.current_spend(ws)
            assert sp.burn_user == 0 and sp.today_user > 0
        finally:
            await ws.close()


async def test_a_launch_that_never_gets_ssh_leaves_nothing_behind(home, aws_env, keypair) -> None:
    with EC2Shim(("198.18.255.254",)) as shim:  # an address nothing answers on
        ws = cloud_config(home, shim, key=keypair, ssh_timeout=1.5, connect_timeout=0.5)
        try:
            with pytest.raises(ProviderError) as err:
                await clouds.up(ws, "aws", "gpu1", size="g4dn.xlarge")
            msg = str(err.value)
            assert "no SSH on gpu1" in msg and "Cleaned up: key, firewall, node" in msg
            assert set(ec2_instances(shim).values()) == {"terminated"}
            assert labdeck_groups(shim) == [] and shim.boto3().describe_key_pairs()["KeyPairs"] == []
            (rec,) = clouds.records(ws, team=False)
            assert rec["state"] == "failed" and rec["running_since"] is None  # billed only while it existed
        finally:
            await ws.close()


async def test_error_paths_are_clear_and_orphan_nothing(home, aws_env, keypair, monkeypatch) -> None:
    with EC2Shim() as shim:
        ws = cloud_config(home, shim, key=keypair)
        try:
            # bad credentials: the listing says so, with what to do
            shim.fail_next("DescribeInstances", "AuthFailure", "AWS was not able to validate the provided access credentials", 401)
            listing = await ws.list_instances()
            assert "credentials were refused" in listing.errors["aws"]
            assert "local" in {i.name for i in listing.instances}  # the others still listed

            # quota: nothing left at the provider
            shim.fail_next("RunInstances", "InstanceLimitExceeded",
                           "You have requested more instances (1) than your current instance limit of 0 allows")
            with pytest.raises(ProviderError, match="over the account's quota") as err:
                await clouds.up(ws, "aws", "gpu1", size="g4dn.xlarge")
            assert "Cleaned up: key, firewall" in str(err.value)
            assert ec2_instances(shim) == {} and labdeck_groups(shim) == []
            assert shim.boto3().describe_key_pairs()["KeyPairs"] == []

            # a size the region does not offer: refused before anything is created
            before = len(shim.actions)
            with pytest.raises(ProviderError, match="not offered in us-east-1"):
                await clouds.up(ws, "aws", "gpu2", size="x9.mega")
            assert not [a for a in shim.actions[before:] if a.startswith(("Create", "Run", "Import"))]

            # the API does not answer: a timeout, not a hang
            shim.delay = 3
            ws.providers["aws"].options["api_timeout"] = 0.5
            t0 = time.monotonic()
            listing = await ws.list_instances()
            assert time.monotonic() - t0 < 2.5
            assert "did not answer" in listing.errors["aws"]
            shim.delay = 0
        finally:
            await ws.close()

    # no credentials anywhere
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "nope"))
    with EC2Shim() as shim:
        ws = cloud_config(home, shim, key=keypair)
        try:
            listing = await ws.list_instances()
            assert "no ec2 credentials found" in listing.errors["aws"]
            p = ws.providers["aws"]
            with pytest.raises(ProviderError) as err:
                await p.list_instances()
            assert "AWS_ACCESS_KEY_ID" in err.value.hint
        finally:
            await ws.close()


async def test_credentials_from_the_aws_file_and_never_in_the_store(home, keypair, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    creds = home / "aws_credentials"
    creds.write_text("[team]\naws_access_key_id = AKIDFROMFILE\naws_secret_access_key = sup3rs3cretvalue\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    with EC2Shim() as shim:
        ws = cloud_config(home, shim, key=keypair, profile="team")
        try:
            listing = await ws.list_instances()
            assert "aws" not in listing.errors
        finally:
            await ws.close()
    stored = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file() and p != creds)
    assert b"sup3rs3cretvalue" not in stored and b"AKIDFROMFILE" not in stored
    # a credentials file that does not parse: the error names the line, never quotes it
    creds.write_text("[team]\naws_access_key_id = AKIDFROMFILE\naws_secret_access_key sup3rs3cretvalue\n")
    with EC2Shim() as shim:
        ws = cloud_config(home, shim, key=keypair, profile="team")
        try:
            listing = await ws.list_instances()
            assert "does not parse" in listing.errors["aws"] and "line 3" in listing.errors["aws"]
            assert "sup3rs3cretvalue" not in listing.errors["aws"]
        finally:
            await ws.close()


async def test_budget_warns_then_refuses(home, aws_env, keypair) -> None:
    with EC2Shim() as shim, contextlib.ExitStack() as stack:
        ws = cloud_config(home, shim, key=keypair, budget=2.0)
        try:
            # 3 hours today of a $0.50/h instance that is still running: $1.50 spent, burning 0.50/h.
            # The clock is pinned: measured to the wall clock, the spend grows while the test runs.
            from datetime import datetime, timezone

            from backends import clock

            stack.enter_context(clock.pinned(datetime(2026, 11, 26, 15, 0, tzinfo=timezone.utc)))
            ws.store.mine.put("instances", "01REC", {"id": "01REC", "name": "old", "provider": "aws", "created_by": ws.user,
                                                    "price_per_hour": 0.5, "running_since": "2026-11-26T12:00:00Z",
                                                    "billed": [], "state": "running", "desired": "running"})
            sp = clouds.current_spend(ws)
            assert sp.burn_user == 0.5 and sp.today_user == pytest.approx(1.5, abs=1e-9)
            before = len(shim.actions)
            with pytest.raises(clouds.BudgetExceeded, match="Over budget") as err:
                await clouds.up(ws, "aws", "gpu1", size="g4dn.xlarge")  # 0.526/h more: passes $2 within the hour
            assert "--over-budget" in err.value.hint
            assert not [a for a in shim.actions[before:] if a.startswith(("Create", "Run", "Import"))]
            from backends.catalog import check_budget

            projected = sp.today_user + 0.5 + 0.526
            calm, near = check_budget(sp, projected / 0.7, 0.526), check_budget(sp, projected / 0.9, 0.526)
            assert calm.ok and not calm.warn
            assert near.ok and near.warn and near.message.startswith("Near budget")
        finally:
            await ws.close()


async def test_instances_made_outside_labdeck_are_listed_and_left_alone(home, aws_env, keypair) -> None:
    with EC2Shim() as shim:
        iid = shim.boto3().run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="p3.2xlarge",
                                         TagSpecifications=[{"ResourceType": "instance",
                                                             "Tags": [{"Key": "Name", "Value": "someones-box"}]}]
                                         )["Instances"][0]["InstanceId"]
        ws = cloud_config(home, shim, key=keypair)
        try:
            listing = await ws.list_instances()
            box = next(i for i in listing.instances if i.provider == "aws")
            assert not box.managed and "outside labdeck" in box.note
            assert box.price_per_hour == pytest.approx(3.06) and box.gpu_summary == "1× V100"
            with pytest.raises(ProviderError, match="not launched by labdeck"):
                await clouds.stop(ws, box.name)
            with pytest.raises(ProviderError, match="not launched by labdeck") as err:
                await clouds.terminate(ws, box.name)
            assert "--force" in err.value.hint
            assert ec2_instances(shim)[iid] == "running"
            await clouds.terminate(ws, box.name, force=True)
            assert ec2_instances(shim)[iid] == "terminated"
        finally:
            await ws.close()


# ---- spot preemption ------------------------------------------------------------------------------

TRAIN = """
import os, sys, time
import labdeck
start = 0
r = labdeck.resume_from()
if r:
    start = int(open(r).read())
    print("resumed from", r, "at step", start, flush=True)
for step in range(start, start + 400):
    labdeck.log({"loss": 1.0 / (step + 1)}, step=step)
    if step % 5 == 0:
        os.makedirs("ckpt", exist_ok=True)
        with open("ckpt/last.txt", "w") as f:
            f.write(str(step))
        labdeck.checkpoint("ckpt/last.txt", step=step)
    if r and step >= start + 3:
        print("done after resume", flush=True)
        break
    time.sleep(0.05)
"""


async def test_spot_preemption_marks_runs_and_relaunches_from_the_checkpoint(home, fresh_rig, aws_env, tmp_path) -> None:
    rig = fresh_rig
    with EC2Shim((rig.host("node1").addr, rig.host("node2").addr)) as shim:
        ws = cloud_config(home, shim, rig=rig, names={"gpu1": "node1", "gpu1-r1": "node2"},
                          spot_relaunch=True, autostop_minutes=0)
        try:
            inst = await clouds.up(ws, "aws", "gpu1", size="g4dn.xlarge", spot=True)
            assert inst.spot
            listing = await ws.list_instances()
            assert next(i for i in listing.instances if i.name == "gpu1").spot
            proj = tmp_path / "proj"
            proj.mkdir()
            (proj / "train.py").write_text(TRAIN)
            run = await ws.launch(f"{rig.python} train.py", instance="gpu1", workdir=str(proj), name="spotty")
            ws.follower.start(run)
            for _ in range(200):  # the follower copies the checkpoint off the instance as it is declared
                run = ws.store.find_run(run.id)
                if run.checkpoint.get("local") and (run.checkpoint.get("step") or 0) >= 10:
                    break
                await asyncio.sleep(0.1)
            assert run.checkpoint.get("local"), run.checkpoint
            await ws.follower.stop_all()

            # the provider takes the spot instance back
            shim.boto3().terminate_instances(InstanceIds=[inst.cloud_id])
            listing = await ws.list_instances()
            assert any("taken by the provider" in e for e in listing.events), listing.events
            run = ws.store.find_run(run.id)
            assert run.state == "preempted" and "taken by the provider" in run.state_reason
            rec = next(r for r in clouds.records(ws, team=False) if r["name"] == "gpu1")
            assert rec["state"] == "preempted" and rec["running_since"] is None

            # relaunched: a new instance, the run started again there from its checkpoint, as a child
            for _ in range(300):
                runs, _ = ws.store.runs(team=False)
                child = next((r for r in runs if r.parent == run.id), None)
                if child is not None:
                    break
                assert not ws.background_errors, ws.background_errors
                await asyncio.sleep(0.1)
            assert child is not None and child.instance == "gpu1-r1" and child.name == "spotty (resumed)"
            assert child.env["LABDECK_RESUME_FROM"].endswith("/last.txt")
            child = await wait_final(ws, child.id, timeout=10)
            assert child.state == "succeeded"
            log = await ws.log_tail(child.id)
            assert f"at step {run.checkpoint['step']}" in log and "done after resume" in log
            edges = ws.store.mine.all("edges")
            assert any(e["parent"] == run.id and e["child"] == child.id and e["kind"] == "resume" for e in edges)
        finally:
            await ws.close()


async def test_autostop_that_fired_while_labdeck_was_closed_is_not_a_preemption(home, fresh_rig, aws_env) -> None:
    """labdeck never saw the daemon fire (its state was never read): EC2's own reason for the stop,
    an OS-initiated shutdown, says it was the instance itself, so no preemption and no relaunch."""
    rig = fresh_rig
    with EC2Shim((rig.host("node1").addr,)) as shim:
        ws = cloud_config(home, shim, rig=rig, spot_relaunch=True)
        try:
            inst = await clouds.up(ws, "aws", "gpu1", size="g4dn.xlarge", autostop_minutes=5)
            ws.autostop_states.clear()  # as after a restart: nothing seen from the daemon
            shim.shutdown_from_inside(inst.cloud_id)
            listing = await ws.list_instances()
            assert any("stopped by autostop" in e for e in listing.events), listing.events
            assert not any("taken by the provider" in e for e in listing.events)
            rec = clouds.my_record(ws, "gpu1")
            assert rec["state"] == "stopped" and rec["desired"] == "stopped" and rec["running_since"] is None
            assert rec.get("relaunch") is None and not ws.relaunching
        finally:
            await ws.close()
