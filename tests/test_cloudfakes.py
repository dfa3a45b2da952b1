"""The fake cloud APIs (tests/cloudfakes.py) driven by apache-libcloud's real drivers over HTTP:
catalogues, the node state machine, tags, keys, firewalls, and the faults (bad credentials,
quota, size not offered, server errors, timeouts, provider-side removal and state changes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import libcloud
import pytest
import requests
from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
from libcloud.common.types import InvalidCredsError, LibcloudError
from libcloud.compute.types import NodeState

from tests.cloudfakes import (
    FAULT_KINDS,
    PROJECT_ID,
    FakeDigitalOcean,
    FakeLinode,
    FakeOpenStack,
    ssh_fingerprint,
)

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl labdeck@test"
POOL = ("198.18.0.10", "198.18.0.11")
FIXTURES = Path(libcloud.__file__).parent / "test" / "compute" / "fixtures"
CLASSES = {"digitalocean": FakeDigitalOcean, "linode": FakeLinode, "openstack": FakeOpenStack}
PENDING = {NodeState.PENDING, NodeState.STARTING}


@pytest.fixture(params=sorted(CLASSES))
def cloud(request):
    with CLASSES[request.param](ip_pool=POOL) as fake:
        yield fake


@pytest.fixture
def do():
    with FakeDigitalOcean(ip_pool=POOL) as fake:
        yield fake


@pytest.fixture
def linode():
    with FakeLinode(ip_pool=POOL) as fake:
        yield fake


@pytest.fixture
def openstack():
    with FakeOpenStack(ip_pool=POOL) as fake:
        yield fake


def by(items, **want):
    return next(i for i in items if all(getattr(i, k) == v for k, v in want.items()))


def create(fake, drv, name, *, gpu=False, tags=("labdeck", "run-abc"), where=None):
    """create_node the way a backend calls it on each provider."""
    if fake.kind == "digitalocean":
        size = by(drv.list_sizes(), id="gpu-h100x1-80gb" if gpu else "s-2vcpu-4gb")
        image = next(i for i in drv.list_images() if i.extra["slug"] == "gpu-h100x1-base")
        location = by(drv.list_locations(), id=where or "nyc2")
        return drv.create_node(name, size, image, location, ex_create_attr={"tags": list(tags)})
    if fake.kind == "linode":
        size = by(drv.list_sizes(), id="g1-gpu-rtx6000-1" if gpu else "g6-standard-2")
        image = by(drv.list_images(), id="linode/ubuntu22.04")
        location = by(drv.list_locations(), id=where or "us-east")
        return drv.create_node(location, name, size, image, root_pass="Lab-deck-Pass-2024", ex_tags=list(tags))
    size = by(drv.list_sizes(), name="g1.a100.1" if gpu else "m1.small")
    return drv.create_node(name, size, by(drv.list_images(), name="Ubuntu 22.04"), ex_metadata={t: "1" for t in tags})


def fetch(fake, drv, node_id):
    """The node as the provider's get call returns it; None when it is gone."""
    try:
        if fake.kind == "linode":
            return drv.ex_get_node(node_id)
        return drv.ex_get_node_details(node_id)  # OpenStack answers None on 404 itself
    except BaseHTTPError as e:  # DigitalOcean
        assert e.code == 404
    except LibcloudError as e:  # Linode
        assert "Not found Status code: 404" in str(e)
    return None


def stop(fake, drv, node):
    return drv.ex_shutdown_node(node) if fake.kind == "digitalocean" else drv.stop_node(node)


def start(fake, drv, node):
    return drv.ex_power_on_node(node) if fake.kind == "digitalocean" else drv.start_node(node)


def tags_of(fake, node):
    return sorted(node.extra["metadata"]) if fake.kind == "openstack" else sorted(node.extra["tags"])


def wait_running(fake, drv, node_id, limit=10):
    for polls in range(1, limit + 1):
        node = fetch(fake, drv, node_id)
        if node.state == NodeState.RUNNING:
            return node, polls
        assert node.state in PENDING
    raise AssertionError(f"{node_id} never ran")


def error_of(fake, kind):
    """(exception class, status or None, text) that libcloud raises for each fault kind."""
    return {
        ("digitalocean", "quota"): (BaseHTTPError, 422, "will exceed your droplet limit"),
        ("linode", "quota"): (LibcloudError, None, "Account Limit reached"),
        ("openstack", "quota"): (BaseHTTPError, 403, "Quota exceeded for instances"),
        ("digitalocean", "server_error"): (BaseHTTPError, 500, "unable to give you a response"),
        ("linode", "server_error"): (LibcloudError, None, "Please try again Status code: 500"),
        ("openstack", "server_error"): (BaseHTTPError, 500, "Unexpected API Error"),
    }[fake.kind, kind]


# -- every provider ------------------------------------------------------------------------------
def test_node_lifecycle(cloud):
    drv = cloud.driver()
    node = create(cloud, drv, "gpu-box-1", gpu=True)
    assert node.state in PENDING and node.name == "gpu-box-1"
    assert node.id in cloud.nodes
    if cloud.kind != "linode":  # DigitalOcean and nova give no address before the node is active
        assert node.public_ips == []
    running, polls = wait_running(cloud, drv, node.id)
    # boot_polls=1: the first GET after create still says provisioning (on OpenStack that GET is
    # the one create_node itself makes), the next one says running
    assert polls == (1 if cloud.kind == "openstack" else 2)
    assert running.public_ips == ["198.18.0.10"]
    assert tags_of(cloud, running) == ["labdeck", "run-abc"]
    listed = by(drv.list_nodes(), id=node.id)
    assert listed.state == NodeState.RUNNING and tags_of(cloud, listed) == ["labdeck", "run-abc"]

    assert stop(cloud, drv, running) is True
    assert fetch(cloud, drv, node.id).state == NodeState.STOPPED
    assert cloud.nodes[node.id]["status"] == {"digitalocean": "off", "linode": "offline", "openstack": "SHUTOFF"}[cloud.kind]
    assert start(cloud, drv, running) is True
    assert fetch(cloud, drv, node.id).state == NodeState.RUNNING

    assert drv.destroy_node(running) is True
    assert node.id not in cloud.nodes
    assert fetch(cloud, drv, node.id) is None
    assert drv.list_nodes() == []


def test_ip_pool_hands_out_addresses_in_order_and_cycles(cloud):
    drv = cloud.driver()
    ids = [create(cloud, drv, f"box-{i}").id for i in range(3)]
    assert [wait_running(cloud, drv, i)[0].public_ips for i in ids] == [["198.18.0.10"], ["198.18.0.11"], ["198.18.0.10"]]


def test_boot_polls_zero_runs_on_first_get(cloud):
    cloud.boot_polls = 0
    drv = cloud.driver()
    node = create(cloud, drv, "quick-box")
    if cloud.kind == "openstack":  # create_node's own GET already saw it running
        assert node.state == NodeState.RUNNING
    else:
        assert node.state in PENDING and wait_running(cloud, drv, node.id)[1] == 1


def test_bad_credentials_raise_invalid_creds_on_every_call(cloud):
    bad = cloud.driver("not-the-token")
    for call in (bad.list_nodes, bad.list_sizes, bad.list_images):
        with pytest.raises(InvalidCredsError):
            call()
    assert cloud.driver().list_nodes() == []  # the right key still works


def test_error_bodies_have_the_provider_shapes(cloud):
    path = {"digitalocean": "/v2/droplets", "linode": "/v4/linode/instances",
            "openstack": f"/compute/v2.1/{PROJECT_ID}/servers/detail"}[cloud.kind]
    reply = requests.get(cloud.url + path, headers={"Authorization": "Bearer nope", "X-Auth-Token": "nope"}, timeout=5)
    assert reply.status_code == 401 and reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == {
        "digitalocean": {"id": "unauthorized", "message": "Unable to authenticate you"},
        "linode": {"errors": [{"reason": "Invalid Token"}]},
        "openstack": {"error": {"message": "The request you have made requires authentication.", "code": 401,
                                "title": "Unauthorized"}},
    }[cloud.kind]
    drv = cloud.driver()
    node = create(cloud, drv, "there-box")
    cloud.fail_next("get_node", "not_found")
    assert fetch(cloud, drv, node.id) is None
    assert fetch(cloud, drv, node.id).name == "there-box"


def test_server_error_once_then_recovers(cloud):
    drv = cloud.driver()
    cloud.fail_next("list_nodes", "server_error")
    exc, status, text = error_of(cloud, "server_error")
    with pytest.raises(exc, match=text) as info:
        drv.list_nodes()
    if status:
        assert info.value.code == status
    assert drv.list_nodes() == []


def test_quota_from_max_nodes_and_from_fail_next(cloud):
    cloud.max_nodes = 1
    drv = cloud.driver()
    create(cloud, drv, "first-box")
    exc, status, text = error_of(cloud, "quota")
    with pytest.raises(exc, match=text) as info:
        create(cloud, drv, "second-box")
    if status:
        assert info.value.code == status
    assert len(cloud.nodes) == 1
    cloud.max_nodes = 5
    cloud.fail_next("create_node", "quota")
    with pytest.raises(exc, match=text):
        create(cloud, drv, "third-box")
    assert create(cloud, drv, "fourth-box").name == "fourth-box"
    assert len(cloud.nodes) == 2


def test_auth_fault_mid_session(cloud):
    drv = cloud.driver()
    drv.list_nodes()
    cloud.fail_next("list_nodes", "auth")
    if cloud.kind == "openstack":  # nova's 401 is a plain BaseHTTPError; libcloud drops its token
        logins = cloud.requests.count(("POST", "/identity/v3/auth/tokens"))
        with pytest.raises(BaseHTTPError) as info:
            drv.list_nodes()
        assert info.value.code == 401
        assert drv.list_nodes() == []
        assert cloud.requests.count(("POST", "/identity/v3/auth/tokens")) == logins + 1
    else:
        with pytest.raises(InvalidCredsError):
            drv.list_nodes()
        assert drv.list_nodes() == []


def test_delay_makes_calls_time_out(cloud):
    drv = cloud.driver(timeout=0.3)
    drv.list_sizes()
    cloud.delay = 2.0
    began = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        drv.list_nodes()
    assert time.monotonic() - began < 1.5


def test_provider_removes_a_node(cloud):
    drv = cloud.driver()
    keep, lose = create(cloud, drv, "keep-box"), create(cloud, drv, "spot-box")
    wait_running(cloud, drv, lose.id)
    cloud.remove_node(lose.id)
    assert [n.id for n in drv.list_nodes()] == [keep.id]
    assert fetch(cloud, drv, lose.id) is None


def test_provider_changes_state(cloud):
    drv = cloud.driver()
    node = create(cloud, drv, "state-box")
    cloud.set_state(node.id, "stopped")
    assert fetch(cloud, drv, node.id).state == NodeState.STOPPED
    cloud.set_state(node.id, "running")
    running = fetch(cloud, drv, node.id)
    assert running.state == NodeState.RUNNING and running.public_ips == ["198.18.0.10"]


def test_size_unavailable(cloud):
    drv = cloud.driver()
    if cloud.kind == "digitalocean":  # GPU droplets are offered in nyc2/tor1, not nyc3
        with pytest.raises(BaseHTTPError, match="Size is not available in this region") as info:
            create(cloud, drv, "gpu-box", gpu=True, where="nyc3")
        assert info.value.code == 422
    elif cloud.kind == "linode":  # us-central lacks the "GPU Linodes" capability; the API says 403
        with pytest.raises(InvalidCredsError, match="not currently available in the selected region"):
            create(cloud, drv, "gpu-box", gpu=True, where="us-central")
    else:  # nova accepts the server, the scheduler puts it in ERROR
        cloud.fail_next("create_node", "size_unavailable")
        node = create(cloud, drv, "gpu-box", gpu=True)
        failed = fetch(cloud, drv, node.id)
        assert failed.state == NodeState.ERROR and failed.public_ips == []
        assert "No valid host was found" in failed.extra["fault"]["message"]
        cloud.sold_out.add("g1.a100.1")
        assert fetch(cloud, drv, create(cloud, drv, "gpu-box-2", gpu=True).id).state == NodeState.ERROR
        assert fetch(cloud, drv, create(cloud, drv, "cpu-box").id).state == NodeState.RUNNING
        return
    assert cloud.nodes == {}
    cloud.fail_next("create_node", "size_unavailable")
    with pytest.raises((BaseHTTPError, InvalidCredsError), match="not"):
        create(cloud, drv, "gpu-box", gpu=True)
    assert create(cloud, drv, "gpu-box", gpu=True).state in PENDING


def test_fail_next_any_op_and_times(cloud):
    drv = cloud.driver()
    with pytest.raises(ValueError):
        cloud.fail_next("list_nodes", "gremlins")
    assert set(FAULT_KINDS) >= {"quota", "auth", "size_unavailable", "server_error"}
    cloud.fail_next("*", "server_error", times=2)
    for call in (drv.list_sizes, drv.list_nodes):
        with pytest.raises((BaseHTTPError, LibcloudError)):
            call()
    assert drv.list_nodes() == []


def test_rate_limit(cloud):
    drv = cloud.driver()
    cloud.fail_next("list_nodes", "rate_limit")
    if cloud.kind == "linode":  # LinodeResponseV4.parse_error raises before libcloud maps the status
        with pytest.raises(LibcloudError, match="Status code: 429"):
            drv.list_nodes()
    else:
        with pytest.raises(RateLimitReachedError) as info:
            drv.list_nodes()
        assert info.value.retry_after == 1.0
    assert drv.list_nodes() == []


def test_requests_log_and_close(cloud):
    drv = cloud.driver()
    drv.list_nodes()
    assert cloud.requests[-1][0] == "GET" and "?" not in cloud.requests[-1][1]
    assert cloud.url == f"http://127.0.0.1:{cloud.port}"
    cloud.close()
    cloud.close()  # idempotent
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(cloud.url + "/", timeout=2)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="libcloud's test fixtures are not installed")
def test_records_carry_the_fixture_field_sets(cloud):
    drv = cloud.driver()
    node = create(cloud, drv, "shape-box")
    wait_running(cloud, drv, node.id)
    rec = cloud.nodes[node.id]

    def fixture(path, *keys):
        obj = json.loads((FIXTURES / path).read_text())
        for k in keys:
            obj = obj[k]
        return set(obj)

    if cloud.kind == "digitalocean":
        assert fixture("digitalocean_v2/list_nodes.json", "droplets", 0) <= set(rec)
        assert fixture("digitalocean_v2/list_nodes.json", "droplets", 0, "image") <= set(rec["image"])
        assert fixture("digitalocean_v2/list_sizes.json", "sizes", 0) <= set(rec["size"])
        assert fixture("digitalocean_v2/list_locations.json", "regions", 0) <= set(rec["region"])
    elif cloud.kind == "linode":
        assert fixture("linode_v4/create_node.json") == set(rec)
        assert fixture("linode_v4/list_types.json", "data", 0) == set(cloud._list_types({}, {})[1]["data"][0])
        assert fixture("linode_v4/list_locations.json", "data", 0) == set(cloud._list_regions({}, {})[1]["data"][0])
        assert fixture("linode_v4/list_images.json", "data", 0) == set(cloud._list_images({}, {})[1]["data"][0])
    else:  # nova 2.1 has no "uuid"; "fault" appears on ERROR servers only
        assert fixture("openstack_v1_1/_servers_detail.json", "servers", 0) - {"uuid", "fault"} <= set(rec)
        sg = next(iter(cloud.firewalls.values()))
        assert fixture("openstack_v1_1/_v2_0__security_group.json", "security_group") <= set(sg)
        rule = sg["security_group_rules"][0]
        assert fixture("openstack_v1_1/_v2_0__security_group_rule.json", "security_group_rule") <= set(rule)


# -- DigitalOcean ------------------------------------------------------------------------------
def test_do_catalogue(do):
    drv = do.driver()
    gpu = by(drv.list_sizes(), id="gpu-h100x1-80gb")
    assert gpu.price == 3.39 and gpu.ram == 245760 and gpu.extra["regions"] == ["nyc2", "tor1"]
    nyc3 = by(drv.list_locations(), id="nyc3")
    assert "gpu-h100x1-80gb" not in [s.id for s in drv.list_sizes(location=nyc3)]
    assert {i.extra["slug"] for i in drv.list_images()} >= {"ubuntu-22-04-x64", "gpu-h100x1-base"}
    assert drv.ex_account_info()["droplet_limit"] == 50


def test_do_keys_user_data_and_tags(do):
    drv = do.driver()
    key = drv.create_key_pair("labdeck", PUBKEY)
    assert key.fingerprint == ssh_fingerprint(PUBKEY) and [k.name for k in drv.list_key_pairs()] == ["labdeck"]
    with pytest.raises(BaseHTTPError, match="already in use"):
        drv.create_key_pair("again", PUBKEY)
    with pytest.raises(BaseHTTPError, match="Key invalid"):
        drv.create_key_pair("junk", "not a key")
    size, image = by(drv.list_sizes(), id="s-2vcpu-4gb"), by(drv.list_images(), name="22.04 (LTS) x64")
    nyc3 = by(drv.list_locations(), id="nyc3")
    attrs = {"tags": ["labdeck", "run:abc"], "ssh_keys": [key.extra["id"]], "user_data": "#cloud-config\n"}
    node = drv.create_node("box", size, image, nyc3, ex_create_attr=attrs)
    sent = do.bodies["create_node"]
    assert sent["ssh_keys"] == [key.extra["id"]] and sent["tags"] == ["labdeck", "run:abc"]
    assert sent["user_data"] is None  # libcloud drops user_data from ex_create_attr ...
    drv.create_node("box2", size, image, nyc3, ex_user_data="#cloud-config\n")
    assert do.bodies["create_node"]["user_data"] == "#cloud-config\n"  # ... ex_user_data carries it
    with pytest.raises(BaseHTTPError, match="tag name") as info:
        drv.create_node("box3", size, image, nyc3, ex_create_attr={"tags": ["run=abc"]})
    assert info.value.code == 422
    assert node.extra["tags"] == ["labdeck", "run:abc"]
    assert drv.delete_key_pair(key) is True and drv.list_key_pairs() == []


def test_do_pagination(do):
    drv = do.driver(ex_per_page=2)
    size, image = by(drv.list_sizes(), id="s-2vcpu-4gb"), by(drv.list_images(), name="22.04 (LTS) x64")
    nyc3 = by(drv.list_locations(), id="nyc3")
    for i in range(5):
        drv.create_node(f"box-{i}", size, image, nyc3)
    before = do.requests.count(("GET", "/v2/droplets"))
    assert [n.name for n in drv.list_nodes()] == [f"box-{i}" for i in range(5)]
    assert do.requests.count(("GET", "/v2/droplets")) - before == 3


def test_do_firewalls(do):
    drv = do.driver()
    node = create(do, drv, "fw-box")
    rules = [{"protocol": "tcp", "ports": "22", "sources": {"addresses": ["0.0.0.0/0", "::/0"]}}]
    body = {"name": "labdeck-ssh", "inbound_rules": rules, "droplet_ids": [int(node.id)], "tags": ["labdeck"]}
    made = drv.connection.request("/v2/firewalls", method="POST", data=json.dumps(body))
    assert made.status == 202 and made.object["firewall"]["status"] == "waiting"
    fid = made.object["firewall"]["id"]
    listed = drv.connection.request("/v2/firewalls").object
    assert listed["meta"]["total"] == 1 and listed["firewalls"][0]["inbound_rules"] == rules
    assert drv.connection.request(f"/v2/firewalls/{fid}").object["firewall"]["droplet_ids"] == [int(node.id)]
    assert drv.connection.request(f"/v2/firewalls/{fid}", method="DELETE").status == 204
    assert do.firewalls == {}
    with pytest.raises(BaseHTTPError) as info:
        drv.connection.request(f"/v2/firewalls/{fid}", method="DELETE")
    assert info.value.code == 404


# -- Linode ----------------------------------------------------------------------------------
def test_linode_catalogue(linode):
    drv = linode.driver()
    gpu = by(drv.list_sizes(), id="g1-gpu-rtx6000-1")
    assert gpu.extra["gpus"] == 1 and gpu.price == 1.5 and gpu.extra["class"] == "gpu"
    regions = {loc.id: loc for loc in drv.list_locations()}
    assert "GPU Linodes" in regions["us-east"].extra["capabilities"]
    assert "GPU Linodes" not in regions["us-central"].extra["capabilities"]
    assert by(drv.list_images(), id="linode/ubuntu22.04").name == "Ubuntu 22.04 LTS"


def test_linode_create_validation_and_keys(linode):
    drv = linode.driver()
    node = create(linode, drv, "gpu-box", gpu=True)
    assert node.public_ips == ["198.18.0.10"] and node.private_ips == []  # 198.18/15 is not private to libcloud
    sent = linode.bodies["create_node"]
    assert sent["tags"] == ["labdeck", "run-abc"] and sent["root_pass"] == "Lab-deck-Pass-2024"
    with pytest.raises(LibcloudError, match="Label must be unique among your linodes-label Status code: 400"):
        create(linode, drv, "gpu-box")
    with pytest.raises(LibcloudError, match="Length must be 3-50 characters-tags"):
        create(linode, drv, "other-box", tags=["x"])
    size, image = by(drv.list_sizes(), id="g6-nanode-1"), by(drv.list_images(), id="linode/debian12")
    keyed = drv.create_node(by(drv.list_locations(), id="eu-west"), "keyed", size, image,
                            root_pass="Lab-deck-Pass-2024", ex_authorized_keys=[PUBKEY], ex_private_ip=True)
    assert linode.bodies["create_node"]["authorized_keys"] == [PUBKEY]
    assert keyed.public_ips == ["198.18.0.11"] and keyed.private_ips[0].startswith("192.168.")


def test_linode_pagination(linode):
    drv = linode.driver()  # libcloud asks for page_size=25
    size, image = by(drv.list_sizes(), id="g6-nanode-1"), by(drv.list_images(), id="linode/debian12")
    where = by(drv.list_locations(), id="us-east")
    for i in range(30):
        drv.create_node(where, f"box-{i}", size, image, root_pass="Lab-deck-Pass-2024")
    before = linode.requests.count(("GET", "/v4/linode/instances"))
    assert len(drv.list_nodes()) == 30
    assert linode.requests.count(("GET", "/v4/linode/instances")) - before == 2


def test_linode_firewalls(linode):
    drv = linode.driver()
    node = create(linode, drv, "fw-box")
    rules = {"inbound_policy": "DROP", "outbound_policy": "ACCEPT", "outbound": [],
             "inbound": [{"action": "ACCEPT", "protocol": "TCP", "ports": "22", "addresses": {"ipv4": ["0.0.0.0/0"]}}]}
    body = {"label": "labdeck-ssh", "rules": rules, "devices": {"linodes": [int(node.id)]}, "tags": ["labdeck"]}
    made = drv.connection.request("/v4/networking/firewalls", method="POST", data=json.dumps(body)).object
    assert made["status"] == "enabled" and made["rules"] == rules
    assert made["entities"] == [{"id": int(node.id), "type": "linode", "label": "fw-box",
                                 "url": f"/v4/linode/instances/{node.id}"}]
    with pytest.raises(LibcloudError, match="Label must be unique"):
        drv.connection.request("/v4/networking/firewalls", method="POST", data=json.dumps(body))
    listed = drv.connection.request("/v4/networking/firewalls").object
    assert listed["results"] == 1 and listed["data"][0]["id"] == made["id"]
    assert drv.connection.request(f"/v4/networking/firewalls/{made['id']}", method="DELETE").object == {}
    assert linode.firewalls == {}


# -- OpenStack -------------------------------------------------------------------------------
def test_openstack_auth_and_catalogue(openstack):
    drv = openstack.driver()
    assert openstack.requests == []  # nothing until the first call
    flavors = {s.name: s for s in drv.list_sizes()}
    assert openstack.requests[0] == ("POST", "/identity/v3/auth/tokens")
    assert openstack.bodies["auth"]["auth"]["scope"]["project"]["name"] == "labdeck"
    assert drv.connection.auth_token in openstack.tokens
    assert drv.connection.get_endpoint() == f"{openstack.url}/compute/v2.1/{PROJECT_ID}"
    assert flavors["g1.a100.1"].vcpus == 12 and flavors["g1.a100.1"].price == 0.0 and "m1.small" in flavors
    assert by(drv.list_images(), name="Ubuntu 22.04").extra["status"] == "active"
    seen = len(openstack.requests)
    assert len(drv.list_locations()) == 1 and len(openstack.requests) == seen  # no API call behind it


def test_openstack_keystone_at_the_root_too(openstack):
    from libcloud.compute.drivers.openstack import OpenStack_2_NodeDriver

    drv = OpenStack_2_NodeDriver("demo", openstack.token, ex_force_auth_url=openstack.url,
                                 ex_force_auth_version="3.x_password", ex_tenant_name="labdeck")
    assert drv.list_nodes() == []
    assert openstack.requests[0] == ("POST", "/v3/auth/tokens")


def test_openstack_keys_groups_and_metadata(openstack):
    drv = openstack.driver()
    key = drv.import_key_pair_from_string("labdeck", PUBKEY)
    assert key.fingerprint == ssh_fingerprint(PUBKEY) and [k.name for k in drv.list_key_pairs()] == ["labdeck"]
    with pytest.raises(BaseHTTPError, match="already exists") as info:
        drv.import_key_pair_from_string("labdeck", PUBKEY)
    assert info.value.code == 409
    group = drv.ex_create_security_group("labdeck-ssh", "ssh from anywhere")
    rule = drv.ex_create_security_group_rule(group, "tcp", 22, 22, cidr="0.0.0.0/0")
    assert (rule.ip_protocol, rule.from_port, rule.to_port, rule.ip_range) == ("tcp", 22, 22, "0.0.0.0/0")
    listed = by(drv.ex_list_security_groups(), name="labdeck-ssh")
    assert [r.from_port for r in listed.rules if r.ip_protocol == "tcp"] == [22]
    size, image = by(drv.list_sizes(), name="g1.a100.1"), by(drv.list_images(), name="Ubuntu 22.04")
    node = drv.create_node("gpu-box", size, image, ex_keyname="labdeck", ex_metadata={"labdeck": "1", "run": "abc"},
                           ex_security_groups=[group])
    assert node.extra["metadata"] == {"labdeck": "1", "run": "abc"} and node.extra["key_name"] == "labdeck"
    assert openstack.nodes[node.id]["security_groups"] == [{"name": "labdeck-ssh"}]
    with pytest.raises(BaseHTTPError, match="in use") as info:
        drv.ex_delete_security_group(group)
    assert info.value.code == 409
    with pytest.raises(BaseHTTPError, match="Invalid key_name"):
        drv.create_node("bad-key", size, image, ex_keyname="nope")
    assert drv.destroy_node(node) is True
    assert drv.ex_delete_security_group(group) is True
    assert drv.delete_key_pair(key) is True and drv.list_key_pairs() == []


def test_openstack_stop_while_building_conflicts(openstack):
    openstack.boot_polls = 3
    drv = openstack.driver()
    node = create(openstack, drv, "slow-box")
    with pytest.raises(BaseHTTPError, match="while it is in vm_state building") as info:
        drv.ex_stop_node(node)
    assert info.value.code == 409
    running, _ = wait_running(openstack, drv, node.id)
    assert drv.ex_stop_node(running) is True
    with pytest.raises(BaseHTTPError, match="Cannot 'stop'"):
        drv.ex_stop_node(running)
    assert drv.ex_start_node(running) is True
