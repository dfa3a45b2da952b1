"""The Instances tab with a cloud: instances (moto EC2 through libcloud) with cost, owner and burn
rate; the launch form; stop/terminate behind a confirmation; a failed launch shown as one message."""

from __future__ import annotations

from textual.widgets import DataTable, Input

from tests.ec2shim import EC2Shim
from tests.test_cloud_ec2 import AMI, cloud_config, ec2_instances
from tui.app import LabdeckApp
from tui.forms import UpScreen
from tui.screenshots import settle
from tui.widgets import ConfirmScreen

SIZE = (150, 40)




def rows(app) -> dict[str, list[str]]:
    t = app.query_one("#instances-table", DataTable)
    return {str(t.get_row_at(i)[0]): [str(c) for c in t.get_row_at(i)] for i in range(t.row_count)}


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_outside_instance_listed_then_terminated_only_after_a_warning(home, aws_env, keypair) -> None:
    with EC2Shim() as shim:
        iid = shim.boto3().run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="g5.xlarge",
                                         TagSpecifications=[{"ResourceType": "instance",
                                                             "Tags": [{"Key": "Name", "Value": "box"}]}])["Instances"][0]["InstanceId"]
        ws = cloud_config(home, shim, key=keypair)
        app = LabdeckApp(ws, live=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            r = rows(app)
            assert r["box"][1:3] == ["aws", "running"] and r["box"][4] == "g5.xlarge" and r["box"][5] == "1× A10G"
            assert r["box"][6] == "$1.006"
            assert "not launched by labdeck" in str(app.query_one("#instances-burn").render())
            table = app.query_one("#instances-table", DataTable)
            table.move_cursor(row=list(r).index("box"))
            await pilot.press("D")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            assert "NOT launched by labdeck" in str(app.screen.detail)
            await pilot.press("n")  # declined: nothing happens
            await settle(pilot)
            assert ec2_instances(shim)[iid] == "running"
            await pilot.press("D")
            await pilot.pause()
            await pilot.press("y")
            await settle(pilot)
            assert ec2_instances(shim)[iid] == "terminated"
            await settle(pilot)
            assert "box" not in rows(app)
        await ws.close()


async def test_launch_form_failure_is_one_message_and_leaves_nothing(home, aws_env, keypair) -> None:
    with EC2Shim(("198.18.255.254",)) as shim:
        ws = cloud_config(home, shim, key=keypair, ssh_timeout=1.0, connect_timeout=0.4)
        app = LabdeckApp(ws, live=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("u")
            await settle(pilot)
            assert isinstance(app.screen, UpScreen)
            name = app.screen.query_one("#up-name", Input)
            assert name.value == "gpu1"
            name.value = "Bad Name"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert "lowercase" in str(app.screen.query_one("#launch-error").render())
            name.value = "trial"
            await pilot.press("ctrl+s")
            await settle(pilot)
            assert not isinstance(app.screen, UpScreen)
            msgs = " ".join(notes(app))
            assert "Launch of trial failed" in msgs and "Cleaned up: key, firewall, node" in msgs
            assert "Traceback" not in msgs
            assert set(ec2_instances(shim).values()) == {"terminated"}
        await ws.close()


async def test_no_cloud_configured_says_how(home) -> None:
    from backends.config import load_config
    from backends.paths import Paths
    from backends.workstation import Workstation

    ws = Workstation(load_config(Paths.resolve(home)))
    app = LabdeckApp(ws, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("u")
        await pilot.pause()
        assert any("No cloud provider is configured" in n for n in notes(app))
        # stop/start/terminate/autostop are not offered for `local` (its provider refuses them): not in the
        # footer, and the key does nothing (issue 17)
        from textual.widgets._footer import FooterKey

        assert not {"Stop", "Start", "Terminate", "Autostop"} & {k.description for k in app.screen.query(FooterKey)}
        before = len(notes(app))
        await pilot.press("s")
        await pilot.pause()
        assert len(notes(app)) == before and app.screen is app.screen_stack[0]
    await ws.close()
