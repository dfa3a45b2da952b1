"""The cloud commands as a user runs them (a subprocess, no terminal) against a DigitalOcean-shaped
server: sizes, catalog refresh, ls with cost and owner, spend, a failing `up`, `down` asking first."""

from __future__ import annotations

import json

import pytest

from tests.cloudfakes import FakeDigitalOcean
from tests.test_cli import labdeck



@pytest.fixture
def do(home, keypair):
    with FakeDigitalOcean(ip_pool=("127.0.0.1",), boot_polls=0) as fake:
        (home / "config.toml").write_text(
            f'[providers.do]\ntype = "digitalocean"\nendpoint = "{fake.url}"\nregion = "nyc2"\n'
            f'ssh_key = "{keypair}"\nssh_timeout = 1\nconnect_timeout = 0.3\npoll_seconds = 0.1\n'
            f'[budget]\ndaily_usd = 100\n')
        yield fake


def run(home, fake, *args, token=None):
    return labdeck(home, *args, env={"DIGITALOCEAN_TOKEN": token or fake.token})


def test_sizes_and_catalog_refresh(home, do) -> None:
    res = run(home, do, "sizes", "do", "--gpu")
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if "gpu-h100x1-80gb" in l)
    assert "1× H100" in line and "$3.390" in line and "provider API" in line
    assert "s-2vcpu-4gb" not in res.stdout  # --gpu
    res = run(home, do, "catalog", "--refresh")
    assert res.returncode == 0, res.stderr
    data = json.loads((home / "data" / "catalog.json").read_text())
    assert data["digitalocean"]["sizes"]["gpu-h100x1-80gb"]["price"]["nyc2"] == 3.39
    assert data["digitalocean"]["sizes"]["gpu-h100x1-80gb"]["gpus"] == 1


def test_ls_spend_and_lifecycle_guards(home, do) -> None:
    from libcloud.compute.base import NodeImage, NodeLocation, NodeSize

    d = do.driver()
    d.create_node("theirs", NodeSize("c-8", "c-8", 0, 0, 0, 0, d), NodeImage("ubuntu-22-04-x64", "", d),
                  NodeLocation("nyc2", "", None, d))
    res = run(home, do, "ls")
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if "theirs" in l)
    assert "c-8" in line or "8 vCPU" in line
    assert "$0.250" in line and "burn: you" in res.stdout
    res = run(home, do, "down", "theirs")
    assert res.returncode == 1 and "without confirmation" in res.stderr and "--yes" in res.stderr
    res = run(home, do, "down", "theirs", "--yes")
    assert res.returncode == 1 and "not launched by labdeck" in res.stderr and "--force" in res.stderr
    assert len(do.nodes) == 1
    res = run(home, do, "down", "theirs", "--yes", "--force")
    assert res.returncode == 0, res.stderr
    assert do.nodes == {}
    res = run(home, do, "spend")
    assert res.returncode == 0 and "of $100.00 budget" in res.stdout


def test_up_failure_is_one_message_and_nothing_is_left(home, do) -> None:
    res = run(home, do, "up", "gpu1", "-p", "do", "--size", "gpu-h100x1-80gb")
    assert res.returncode == 1
    assert "Launch of gpu1 failed" in res.stderr and "Cleaned up" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert "creating" in res.stdout and "cleanup" in res.stdout  # progress was shown
    assert do.nodes == {} and not [f for f in do.firewalls.values() if "labdeck" in json.dumps(f)]
    res = run(home, do, "up", "gpu1", "-p", "do", token="bad")
    assert res.returncode == 1 and "credentials were refused" in res.stderr and "DIGITALOCEAN_TOKEN" in res.stderr
    res = run(home, do, "up", "gpu1", "-p", "nope")
    assert res.returncode == 1 and "not a cloud provider" in res.stderr


def test_an_ec2_size_outside_the_catalog_has_its_shape() -> None:
    """vCPUs and memory of any EC2 size from libcloud's offline table (the listing and every run's
    instance record show them), like its GPUs, not only of the few sizes the shipped catalog names."""
    from backends.catalog import Catalog

    info = Catalog().describe("ec2", "p3.2xlarge", "us-east-1")
    assert (info.vcpus, info.ram_mib, info.gpus) == (8, 61 * 1024, 1)


def test_sizes_spend_and_ls_as_json_and_a_missing_provider_named(home, do) -> None:
    """`--json` for the cloud listings (field names: README, "JSON output"); a command missing its
    provider lists the configured ones instead of click's bare "Missing argument"."""
    from tests.test_cli_output import readme_fields

    fields = readme_fields()
    res = run(home, do, "sizes", "do", "--gpu", "--json")
    assert res.returncode == 0, res.stderr
    sizes = json.loads(res.stdout)
    assert sizes and all(set(s) == fields["sizes"] and s["gpus"] > 0 for s in sizes)
    h100 = next(s for s in sizes if s["id"] == "gpu-h100x1-80gb")
    assert (h100["provider"], h100["region"], h100["price_per_hour"], h100["price_source"]) == ("do", "nyc2", 3.39, "provider API")
    res = run(home, do, "spend", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["daily_budget_usd"] == 100.0
    res = run(home, do, "ls", "--json")
    assert res.returncode == 0, res.stderr
    assert [i["name"] for i in json.loads(res.stdout)] == ["local"]  # no droplet yet
    for args, usage in ((("sizes",), "labdeck sizes do"), (("up", "gpu1"), "labdeck up gpu1 --provider do")):
        res = run(home, do, *args)
        assert res.returncode == 1 and "Missing argument" not in res.stderr
        assert f"Which cloud provider? Give one: {usage}" in res.stderr and "Configured cloud providers: do." in res.stderr
