"""Stateful fake cloud APIs that apache-libcloud's *real* compute drivers talk to over HTTP.

Three providers, one base class (:class:`FakeCloud`), each an HTTP server on 127.0.0.1 (a port
of its own, stdlib ``ThreadingHTTPServer`` in a daemon thread):

* :class:`FakeDigitalOcean` -- DigitalOcean API v2 (``DigitalOcean_v2_NodeDriver``), plus
  ``/v2/firewalls`` and ``/v2/account``, which libcloud has no call for.
* :class:`FakeLinode` -- Linode API v4 (``LinodeNodeDriver(key, api_version="4.0")``), plus
  ``/v4/networking/firewalls``.
* :class:`FakeOpenStack` -- keystone v3 password auth (at ``/identity`` as on devstack, or at
  the root) whose service catalog points nova (compute 2.1), glance (image v2) and neutron
  (network 2.0) back at this server (``OpenStack_2_NodeDriver``; its security groups are
  neutron's, not nova's).

What is recorded (real): every JSON body has the field set of the provider's API as libcloud's
own test fixtures record it (``libcloud/test/compute/fixtures/{digitalocean_v2,linode_v4,
openstack_v1_1,openstack}/``, file named next to each template); the catalogues (sizes, images,
regions) are fixture records or real offers in that shape; error statuses and bodies are the
providers' real ones (DigitalOcean ``{"id", "message"}``, Linode ``{"errors": [{"reason"}]}``,
nova ``{"itemNotFound": {"message", "code"}}``, neutron ``{"NeutronError": ...}``, keystone
``{"error": ...}``), with messages seen from the real APIs where known.

What is simulated: the state machine (a new node reports "new" / "provisioning" / "BUILD" for
``boot_polls`` GETs or listings that include it, then "active" / "running" / "ACTIVE"; stop,
start, destroy), the account (``max_nodes`` quota, public IPv4s drawn in order from ``ip_pool``),
validation a real API does on create (size offered in the region, tag syntax, label uniqueness),
and injected faults (``fail_next``, ``delay``, ``remove_node``, ``set_state``).  As on the real
APIs, a DigitalOcean droplet and a nova server have no addresses until they are active (the
create reply carries none); a Linode has its IPv4 from the create reply on.

Fault ``op`` names (``fail_next``; ``"*"`` is any): create_node list_nodes get_node
destroy_node start_node stop_node reboot_node list_sizes list_images list_locations
list_key_pairs create_key_pair delete_key_pair create_firewall list_firewalls get_firewall
delete_firewall create_firewall_rule delete_firewall_rule account auth (keystone token).
Fault kinds (``FAULT_KINDS``): quota auth size_unavailable server_error rate_limit not_found.
How libcloud surfaces them differs per provider, as against the real APIs: DigitalOcean and
nova errors are ``BaseHTTPError`` with ``.code``; Linode's are ``LibcloudError("<reason>[-<field>]
Status code: N.")`` except 401/403, which are ``InvalidCredsError`` -- and Linode answers 403
for a plan not offered in a region.  A nova "size_unavailable" is not an HTTP error: the server
is accepted and goes to ERROR with a "No valid host was found" fault (also for flavors in
``FakeOpenStack.sold_out``).  An OpenStack "auth" fault is nova's 401 (``BaseHTTPError``, and
libcloud re-authenticates on the next call); wrong credentials fail at keystone
(``InvalidCredsError``).

libcloud 3.9.1 quirks met here: ``DigitalOcean_v2_NodeDriver(key)`` raises TypeError and
``DigitalOceanNodeDriver(key)`` accepts no other keyword, so ``FakeDigitalOcean.driver`` aims the
connection (host/port/secure/timeout) by hand; DigitalOcean drops ``user_data`` from
``ex_create_attr`` (use ``ex_user_data``); OpenStack ``list_locations`` makes no request; each of
the OpenStack driver's compute/image/network connections authenticates on its own.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import itertools
import json
import re
import threading
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

FAULT_KINDS = ("quota", "auth", "size_unavailable", "server_error", "rate_limit", "not_found")
__all__ = ["FAULT_KINDS", "PROJECT_ID", "FakeCloud", "FakeDigitalOcean", "FakeLinode", "FakeOpenStack", "ssh_fingerprint"]


def _now(fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    return datetime.now(UTC).strftime(fmt)


def ssh_fingerprint(public_key: str) -> str | None:
    """The MD5 colon fingerprint both DigitalOcean and nova report, or None for a malformed key."""
    parts = (public_key or "").split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")):
        return None
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    digest = hashlib.md5(blob).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


class Reply(Exception):
    """Raised by a handler to answer at once (errors)."""

    def __init__(self, status: int, body=None, headers=None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class _Handler(BaseHTTPRequestHandler):
    def _serve(self):
        n = int(self.headers.get("Content-Length") or 0)
        status, data, headers = self.server.fake._dispatch(
            self.command, self.path, self.headers, self.rfile.read(n) if n else b""
        )
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if data is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")
        except OSError:  # the client gave up waiting (timeout tests)
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


class FakeCloud:
    """Base: server lifecycle, request log, dispatch, auth, faults and the boot state machine."""

    kind = ""
    ROUTES: tuple = ()  # (method, path regex, op, handler name); handlers get (*groups, q, data)
    ERRORS: dict = {}  # kind -> (status, provider error id, message)
    STATES: dict = {}  # generic state name -> the provider's word
    WRAP = {}  # "node"/"firewall" -> key a single object is wrapped in (DigitalOcean: "droplet", ...)
    DELETED = (204, None)  # the reply to a DELETE

    def __init__(self, *, token="test-token", ip_pool=("198.18.0.10",), boot_polls=1, max_nodes=50):
        self.token, self.boot_polls, self.max_nodes = token, boot_polls, max_nodes
        self.ip_pool = tuple(ip_pool)
        self.nodes: dict = {}  # str(id) -> the node record as the API serves it
        self.firewalls: dict = {}  # str(id) -> firewall / security group record
        self.keys: dict = {}  # str(id) (nova: name) -> SSH key record
        self.requests: list = []  # (method, path) of every request, query string dropped
        self.bodies: dict = {}  # op -> JSON body of the last POST/PUT for that op
        self.delay = 0.0
        self._faults: list = []
        self._booting: dict = {}  # str(id) -> GETs left before it is running
        self._ip: dict = {}  # str(id) -> public IPv4 handed out at create
        self._ips = itertools.cycle(self.ip_pool)
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._server = None
        self.port = None
        self._routes = [(m, re.compile(rx), op, h) for m, rx, op, h in self.ROUTES]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FakeCloud:
        if self._server is None:
            self._closed.clear()
            self._server = _Server(("127.0.0.1", 0), _Handler)
            self._server.fake = self
            self.port = self._server.server_address[1]
            threading.Thread(target=self._server.serve_forever, args=(0.05,), name=f"fake-{self.kind}", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def driver(self, key=None, **kwargs):
        raise NotImplementedError

    # -- test controls ----------------------------------------------------------------------
    def fail_next(self, op: str, kind: str, times: int = 1) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._faults.append([op, kind, times])

    def remove_node(self, node_id) -> None:
        with self._lock:
            self.nodes.pop(str(node_id))
            self._booting.pop(str(node_id), None)

    def set_state(self, node_id, state: str) -> None:
        """Provider-side state change; ``state`` is the provider's word or running/stopped/provisioning."""
        with self._lock:
            key = str(node_id)
            self._booting.pop(key, None)
            state = self.STATES.get(state, state)
            if state == self.STATES["running"]:
                self._activate(key)
            else:
                self._set_status(self.nodes[key], state)

    # -- provider hooks (also _error_body, _set_status, _activate, _action_op) ---------------------
    def _check_auth(self, headers, op):
        if headers.get("Authorization") != f"Bearer {self.token}":
            raise self._err("auth")

    def _inject(self, op, kind):
        raise self._err(kind)

    # -- helpers ----------------------------------------------------------------------------
    def _err(self, kind, message=None, field=None, **fmt) -> Reply:
        status, ident, default = self.ERRORS[kind]
        text = (message or default).format(**fmt) if fmt else message or default
        headers = {"Retry-After": "1"} if kind == "rate_limit" else {}
        return Reply(status, self._error_body(status, ident, text, field), headers)

    def _new_node(self, key, rec):
        self.nodes[key] = rec
        self._booting[key] = self.boot_polls

    def _next_ip(self, key):
        self._ip[key] = next(self._ips)
        return self._ip[key]

    def _seen(self, key):
        """A GET or listing includes node ``key``: count down its boot."""
        left = self._booting.get(key)
        if left is None:
            return
        if left > 0:
            self._booting[key] = left - 1
        else:
            del self._booting[key]
            self._activate(key)

    def _node(self, key):
        if key not in self.nodes:
            raise self._err("not_found", self._missing(key))
        return self.nodes[key]

    def _missing(self, key):
        return None

    def _wrap(self, what, rec):
        return {self.WRAP[what]: rec} if what in self.WRAP else rec

    def _get_node(self, key, q, data):
        rec = self._node(key)
        self._seen(key)
        return 200, self._wrap("node", rec)

    def _destroy_node(self, key, q, data):
        self._node(key)
        self.remove_node(key)
        return self.DELETED

    def _get_firewall(self, fid, q, data):
        if fid not in self.firewalls:
            raise self._err("not_found")
        return 200, self._wrap("firewall", self.firewalls[fid])

    def _delete_firewall(self, fid, q, data):
        if self.firewalls.pop(fid, None) is None:
            raise self._err("not_found")
        return self.DELETED

    def _take_fault(self, op):
        for f in self._faults:
            if f[0] in (op, "*"):
                f[2] -= 1
                if f[2] <= 0:
                    self._faults.remove(f)
                return f[1]
        return None

    def _dispatch(self, method, raw_path, headers, body):
        parts = urlsplit(raw_path)
        path, q = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            self.requests.append((method, path))
        if self.delay:
            self._closed.wait(self.delay)
        with self._lock:
            self._path = path
            try:
                for m, rx, op, name in self._routes:
                    match = rx.fullmatch(path) if m == method else None
                    if match:
                        break
                else:
                    raise self._err("not_found")
                try:
                    data = json.loads(body) if body.strip() else {}
                except ValueError:
                    raise self._err("invalid", "Malformed JSON body") from None
                if op == "action":
                    op = self._action_op(data)
                self._check_auth(headers, op)
                kind = self._take_fault(op)
                if kind:
                    self._inject(op, kind)
                if method in ("POST", "PUT"):
                    self.bodies[op] = copy.deepcopy(data)
                status, obj, *extra = getattr(self, name)(*match.groups(), q=q, data=data)
                hdrs = extra[0] if extra else {}
            except Reply as r:
                status, obj, hdrs = r.status, r.body, r.headers
            return status, None if obj is None else json.dumps(obj).encode(), hdrs


# ======================================================================================
# DigitalOcean v2
# ======================================================================================
_DO_ALL = ["nyc1", "nyc2", "nyc3", "sfo3", "tor1", "ams3", "fra1"]
# shape: digitalocean_v2/list_sizes.json + the "size" object of list_nodes.json (+ "description",
# "gpu_info" that the real API adds); GPU sizes are in a few regions only, as on the real API.
_DO_SIZES = [
    dict(slug="s-2vcpu-4gb", memory=4096, vcpus=2, disk=80, transfer=4.0, price_monthly=24.0,
         price_hourly=0.03571, regions=_DO_ALL, available=True, description="Basic"),
    dict(slug="c-8", memory=16384, vcpus=8, disk=100, transfer=6.0, price_monthly=168.0,
         price_hourly=0.25, regions=_DO_ALL, available=True, description="CPU-Optimized"),
    dict(slug="gpu-h100x1-80gb", memory=245760, vcpus=20, disk=720, transfer=15.0,
         price_monthly=2522.16, price_hourly=3.39, regions=["nyc2", "tor1"], available=True,
         description="H100 GPU - 1X", gpu_info={"count": 1, "vram": {"amount": 80, "unit": "gib"}, "model": "nvidia_h100"}),
    dict(slug="gpu-h100x8-640gb", memory=1966080, vcpus=160, disk=2046, transfer=60.0,
         price_monthly=17796.48, price_hourly=23.92, regions=["nyc2", "tor1"], available=True,
         description="H100 GPU - 8X", gpu_info={"count": 8, "vram": {"amount": 640, "unit": "gib"}, "model": "nvidia_h100"}),
]
# shape: digitalocean_v2/list_nodes.json "image"
_DO_IMAGES = [
    dict(id=129211873, name="22.04 (LTS) x64", distribution="Ubuntu", slug="ubuntu-22-04-x64", public=True,
         regions=_DO_ALL, created_at="2023-03-01T16:37:34Z", min_disk_size=7, type="base",
         size_gigabytes=2.36, description="Ubuntu 22.04 (LTS) x64", tags=[], status="available"),
    dict(id=151029453, name="AI/ML Ready H100x1", distribution="Ubuntu", slug="gpu-h100x1-base", public=True,
         regions=["nyc2", "tor1"], created_at="2024-03-12T10:04:11Z", min_disk_size=50, type="base",
         size_gigabytes=19.8, description="Ubuntu 22.04 with NVIDIA drivers, CUDA and the NVIDIA container toolkit",
         tags=[], status="available"),
]
_DO_REGION_NAMES = {"nyc1": "New York 1", "nyc2": "New York 2", "nyc3": "New York 3", "sfo3": "San Francisco 3",
                    "tor1": "Toronto 1", "ams3": "Amsterdam 3", "fra1": "Frankfurt 1"}
_DO_TAG = re.compile(r"[A-Za-z0-9_:\-]{1,255}")


class FakeDigitalOcean(FakeCloud):
    kind = "digitalocean"
    STATES = {"running": "active", "stopped": "off", "provisioning": "new", "terminated": "archive"}
    WRAP = {"node": "droplet", "firewall": "firewall"}
    ERRORS = {
        "auth": (401, "unauthorized", "Unable to authenticate you"),
        "quota": (422, "unprocessable_entity", "creating this/these droplet(s) will exceed your droplet limit"),
        "size_unavailable": (422, "unprocessable_entity", "Size is not available in this region."),
        "server_error": (500, "server_error", "Server was unable to give you a response."),
        "rate_limit": (429, "too_many_requests", "API Rate limit exceeded."),
        "not_found": (404, "not_found", "The resource you were accessing could not be found."),
        "invalid": (422, "unprocessable_entity", "{what}"),
    }
    ROUTES = (
        ("GET", r"/v2/account", "account", "_account"),
        ("GET", r"/v2/droplets", "list_nodes", "_list_nodes"),
        ("POST", r"/v2/droplets", "create_node", "_create_node"),
        ("GET", r"/v2/droplets/(\d+)", "get_node", "_get_node"),
        ("DELETE", r"/v2/droplets/(\d+)", "destroy_node", "_destroy_node"),
        ("POST", r"/v2/droplets/(\d+)/actions", "action", "_node_action"),
        ("GET", r"/v2/sizes", "list_sizes", "_list_sizes"),
        ("GET", r"/v2/images", "list_images", "_list_images"),
        ("GET", r"/v2/regions", "list_locations", "_list_regions"),
        ("GET", r"/v2/account/keys", "list_key_pairs", "_list_keys"),
        ("POST", r"/v2/account/keys", "create_key_pair", "_create_key"),
        ("GET", r"/v2/account/keys/([^/]+)", "get_key_pair", "_get_key"),
        ("DELETE", r"/v2/account/keys/([^/]+)", "delete_key_pair", "_delete_key"),
        ("GET", r"/v2/firewalls", "list_firewalls", "_list_firewalls"),
        ("POST", r"/v2/firewalls", "create_firewall", "_create_firewall"),
        ("GET", r"/v2/firewalls/([^/]+)", "get_firewall", "_get_firewall"),
        ("DELETE", r"/v2/firewalls/([^/]+)", "delete_firewall", "_delete_firewall"),
    )
    _ACTIONS = {"shutdown": "stop_node", "power_off": "stop_node", "power_on": "start_node",
                "reboot": "reboot_node", "power_cycle": "reboot_node"}

    def __init__(self, **kw):
        super().__init__(**kw)
        self._ids = itertools.count(400000001)

    def driver(self, key=None, **kwargs):
        from libcloud.compute.drivers.digitalocean import DigitalOceanNodeDriver

        # libcloud 3.9.1: DigitalOcean_v2_NodeDriver(...) raises TypeError (its __new__ chain drops `key`),
        # DigitalOceanNodeDriver(key) works but takes no other keyword (object.__new__ gets them), and
        # DigitalOcean_v2_BaseDriver.__init__ would drop secure/host/port anyway: aim the connection by hand.
        drv = DigitalOceanNodeDriver(key or self.token)
        drv.ex_per_page = kwargs.pop("ex_per_page", drv.ex_per_page)
        conn = drv.connection
        conn.timeout = kwargs.pop("timeout", conn.timeout)
        if kwargs:
            raise TypeError(f"unsupported driver kwargs: {sorted(kwargs)}")
        conn.host, conn.port, conn.secure = "127.0.0.1", self.port, False
        conn.connect()
        return drv

    def _error_body(self, status, ident, message, field=None):
        return {"id": ident, "message": message}

    def _action_op(self, data):
        return self._ACTIONS.get(data.get("type"), "node_action")

    @staticmethod
    def _page(items, key, q, path):
        """DigitalOcean pagination: ?page=&per_page=, links.pages.{first,prev,next,last}, meta.total."""
        per, page = max(1, int(q.get("per_page", 20))), max(1, int(q.get("page", 1)))
        pages = max(1, -(-len(items) // per))
        href = lambda n: f"https://api.digitalocean.com{path}?page={n}&per_page={per}"
        links = {}
        if pages > 1:
            links["pages"] = {}
            if page > 1:
                links["pages"].update(first=href(1), prev=href(page - 1))
            if page < pages:  # the last page has no "last" link (libcloud reads it on page 1 only)
                links["pages"].update(next=href(page + 1), last=href(pages))
        return 200, {key: items[(page - 1) * per : page * per], "links": links, "meta": {"total": len(items)}}

    def _region(self, slug):
        sizes = [s["slug"] for s in _DO_SIZES if slug in s["regions"]]
        # shape: digitalocean_v2/list_locations.json
        return {"slug": slug, "name": _DO_REGION_NAMES[slug], "sizes": sizes, "available": True,
                "features": ["backups", "ipv6", "metadata", "install_agent", "storage", "image_transfer"]}

    # -- droplets ---------------------------------------------------------------------------
    def _account(self, q, data):
        return 200, {"account": {"droplet_limit": self.max_nodes, "floating_ip_limit": 3, "volume_limit": 100,
                                 "email": "dev@example.com", "uuid": "b6fr89dbf6d9156cace5f3c78dc9851d957381ef",
                                 "email_verified": True, "status": "active", "status_message": ""}}

    def _list_nodes(self, q, data):
        recs = [r for r in self.nodes.values() if "tag_name" not in q or q["tag_name"] in r["tags"]]
        status, body = self._page(recs, "droplets", q, "/v2/droplets")
        for rec in body["droplets"]:
            self._seen(str(rec["id"]))
        return status, body

    def _create_node(self, q, data):
        size = next((s for s in _DO_SIZES if s["slug"] == data.get("size")), None)
        image = next((i for i in _DO_IMAGES if str(data.get("image")) in (str(i["id"]), i["slug"])), None)
        what = ("name" if not data.get("name") else "size" if size is None else "image" if image is None
                else "region" if data.get("region") not in _DO_REGION_NAMES else None)
        if what:
            raise self._err("invalid", what=f"You specified an invalid {what} for Droplet creation.")
        if data["region"] not in size["regions"]:
            raise self._err("size_unavailable")
        tags = data.get("tags") or []
        bad = [t for t in tags if not isinstance(t, str) or not _DO_TAG.fullmatch(t)]
        if bad:
            raise self._err("invalid", what=f"tag name {bad[0]!r} is invalid: tags may contain letters, "
                            "numbers, colons, dashes, and underscores")
        if len(self.nodes) >= self.max_nodes:
            raise self._err("quota")
        did = next(self._ids)
        rec = {  # shape: digitalocean_v2/list_nodes.json (a droplet as the create reply has it)
            "id": did, "name": data["name"], "memory": size["memory"], "vcpus": size["vcpus"], "disk": size["disk"],
            "locked": False, "status": "new", "kernel": None, "created_at": _now(), "features": ["monitoring"],
            "backup_ids": [], "next_backup_window": None, "snapshot_ids": [], "image": copy.deepcopy(image),
            "volume_ids": [], "size": copy.deepcopy(size), "size_slug": size["slug"],
            "networks": {"v4": [], "v6": []}, "region": self._region(data["region"]), "tags": list(tags),
            "vpc_uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, data["region"])),
        }
        self._new_node(str(did), rec)
        self._next_ip(str(did))
        href = f"https://api.digitalocean.com/v2/actions/{did + 7}"
        return 202, {"droplet": rec, "links": {"actions": [{"id": did + 7, "rel": "create", "href": href}]}}

    def _activate(self, key):
        rec, n = self.nodes[key], int(key) % 250 + 2
        ip = self._ip[key]
        rec["status"] = "active"
        rec["networks"] = {"v4": [
            {"ip_address": ip, "netmask": "255.255.240.0", "gateway": ip.rsplit(".", 1)[0] + ".1", "type": "public"},
            {"ip_address": f"10.124.0.{n}", "netmask": "255.255.240.0", "gateway": "<nil>", "type": "private"},
        ], "v6": []}

    def _set_status(self, rec, status):
        rec["status"] = status

    def _node_action(self, did, q, data):
        rec = self._node(did)
        kind = data.get("type")
        if kind not in self._ACTIONS:
            raise self._err("invalid", what=f"{kind!r} is not a valid droplet action type")
        self._booting.pop(did, None)
        if self._ACTIONS[kind] == "stop_node":
            rec["status"] = "off"
        else:
            self._activate(did)
        action = {"id": int(did) + 11, "status": "in-progress", "type": kind, "started_at": _now(),
                  "completed_at": None, "resource_id": int(did), "resource_type": "droplet",
                  "region": rec["region"], "region_slug": rec["region"]["slug"]}
        return 201, {"action": action}  # shape: digitalocean_v2/ex_shutdown_node.json

    # -- catalogue --------------------------------------------------------------------------
    def _list_sizes(self, q, data):
        return self._page(copy.deepcopy(_DO_SIZES), "sizes", q, "/v2/sizes")

    def _list_images(self, q, data):
        return self._page(copy.deepcopy(_DO_IMAGES), "images", q, "/v2/images")

    def _list_regions(self, q, data):
        return self._page([self._region(s) for s in _DO_REGION_NAMES], "regions", q, "/v2/regions")

    # -- SSH keys (shape: digitalocean_v2/list_key_pairs.json) ----------------------------------
    def _list_keys(self, q, data):
        return self._page(list(self.keys.values()), "ssh_keys", q, "/v2/account/keys")

    def _create_key(self, q, data):
        fp = ssh_fingerprint(data.get("public_key", ""))
        if fp is None or not data.get("name"):
            raise self._err("invalid", what="Key invalid, key should be of the format `type key [comment]`")
        if any(k["fingerprint"] == fp for k in self.keys.values()):
            raise self._err("invalid", what="SSH Key is already in use on your account")
        kid = next(self._ids)
        self.keys[str(kid)] = {"id": kid, "fingerprint": fp, "public_key": data["public_key"], "name": data["name"]}
        return 201, {"ssh_key": self.keys[str(kid)]}

    def _key(self, ref):
        for kid, k in self.keys.items():
            if ref in (kid, k["fingerprint"]):
                return kid
        raise self._err("not_found")

    def _get_key(self, ref, q, data):
        return 200, {"ssh_key": self.keys[self._key(ref)]}

    def _delete_key(self, ref, q, data):
        del self.keys[self._key(ref)]
        return 204, None

    # -- firewalls (shape: DigitalOcean API v2 "firewall") ------------------------------------
    def _list_firewalls(self, q, data):
        return self._page(list(self.firewalls.values()), "firewalls", q, "/v2/firewalls")

    def _create_firewall(self, q, data):
        if not data.get("name"):
            raise self._err("invalid", what="name is required")
        missing = [d for d in data.get("droplet_ids") or [] if str(d) not in self.nodes]
        if missing:
            raise self._err("invalid", what=f"droplet {missing[0]} does not exist")
        fid = str(uuid.uuid4())
        rec = {"id": fid, "name": data["name"], "status": "succeeded", "created_at": _now(),
               "inbound_rules": data.get("inbound_rules") or [], "outbound_rules": data.get("outbound_rules") or [],
               "droplet_ids": data.get("droplet_ids") or [], "tags": data.get("tags") or [], "pending_changes": []}
        self.firewalls[fid] = rec
        pending = [{"droplet_id": d, "removing": False, "status": "waiting"} for d in rec["droplet_ids"]]
        return 202, {"firewall": dict(rec, status="waiting", pending_changes=pending)}


# ======================================================================================
# Linode v4
# ======================================================================================
def _linode_type(tid, cls, label, vcpus, memory, disk, transfer, network_out, hourly, monthly, gpus=0, backup=(0.003, 2.0)):
    # shape: linode_v4/list_types.json (these four are records of that fixture)
    return {"addons": {"backups": {"price": {"hourly": backup[0], "monthly": backup[1]}}}, "class": cls,
            "disk": disk, "gpus": gpus, "id": tid, "label": label, "memory": memory, "network_out": network_out,
            "price": {"hourly": hourly, "monthly": monthly}, "successor": None, "transfer": transfer, "vcpus": vcpus}


_LINODE_TYPES = [
    _linode_type("g6-nanode-1", "nanode", "Nanode 1GB", 1, 1024, 25600, 1000, 1000, 0.0075, 5.0),
    _linode_type("g6-standard-2", "standard", "Linode 4GB", 2, 4096, 81920, 4000, 4000, 0.03, 20.0, backup=(0.008, 5.0)),
    _linode_type("g6-dedicated-8", "dedicated", "Dedicated 16GB", 8, 16384, 327680, 6000, 6000, 0.18, 120.0, backup=(0.03, 20.0)),
    _linode_type("g1-gpu-rtx6000-1", "gpu", "Dedicated 32GB + RTX6000 GPU x1", 8, 32768, 655360, 16000, 10000,
                 1.5, 1000.0, gpus=1, backup=(0.06, 40.0)),
]
# shape: linode_v4/list_locations.json; GPU plans only where "GPU Linodes" is a capability
_LINODE_REGIONS = [
    {"id": rid, "country": country, "status": "ok", "capabilities": caps,
     "resolvers": {"ipv4": "173.255.192.5,173.255.193.5", "ipv6": "2600:3c03::5,2600:3c03::6"}}
    for rid, country, caps in [
        ("us-east", "us", ["Linodes", "NodeBalancers", "Block Storage", "GPU Linodes", "Cloud Firewall", "Vlans"]),
        ("us-central", "us", ["Linodes", "NodeBalancers", "Block Storage", "Cloud Firewall", "Vlans"]),
        ("eu-west", "uk", ["Linodes", "NodeBalancers", "Block Storage", "Cloud Firewall"]),
        ("ap-west", "in", ["Linodes", "NodeBalancers", "Block Storage", "GPU Linodes", "Cloud Firewall", "Vlans"]),
    ]
]
# shape: linode_v4/list_images.json
_LINODE_IMAGES = [
    {"created": created, "created_by": "linode", "deprecated": False, "description": "", "eol": eol, "expiry": None,
     "id": iid, "is_public": True, "label": label, "size": size, "type": "manual", "vendor": vendor}
    for iid, label, vendor, size, created, eol in [
        ("linode/ubuntu22.04", "Ubuntu 22.04 LTS", "Ubuntu", 2500, "2022-04-21T19:17:32", "2027-04-01T04:00:00"),
        ("linode/debian12", "Debian 12", "Debian", 1300, "2023-06-12T17:44:27", "2028-06-30T04:00:00"),
    ]
]


class FakeLinode(FakeCloud):
    kind = "linode"
    STATES = {"running": "running", "stopped": "offline", "provisioning": "provisioning"}
    DELETED = (200, {})
    ERRORS = {
        "auth": (401, None, "Invalid Token"),
        "quota": (400, None, "Account Limit reached. Please open a support ticket."),
        # the real API answers 403 here, which libcloud turns into InvalidCredsError
        "size_unavailable": (403, None, ("The Linode plan you chose is not currently available in the selected "
                                         "region. Please select another region or plan type, or contact Support "
                                         "for assistance.")),
        "server_error": (500, None, "Please try again"),
        "rate_limit": (429, None, "Too Many Requests"),
        "not_found": (404, None, "Not found"),
        "invalid": (400, None, "{what}"),
    }
    ROUTES = (
        ("GET", r"/v4/linode/instances", "list_nodes", "_list_nodes"),
        ("POST", r"/v4/linode/instances", "create_node", "_create_node"),
        ("GET", r"/v4/linode/instances/(\d+)", "get_node", "_get_node"),
        ("DELETE", r"/v4/linode/instances/(\d+)", "destroy_node", "_destroy_node"),
        ("POST", r"/v4/linode/instances/(\d+)/boot", "start_node", "_boot"),
        ("POST", r"/v4/linode/instances/(\d+)/reboot", "reboot_node", "_boot"),
        ("POST", r"/v4/linode/instances/(\d+)/shutdown", "stop_node", "_shutdown"),
        ("GET", r"/v4/linode/types", "list_sizes", "_list_types"),
        ("GET", r"/v4/images", "list_images", "_list_images"),
        ("GET", r"/v4/regions", "list_locations", "_list_regions"),
        ("GET", r"/v4/networking/firewalls", "list_firewalls", "_list_firewalls"),
        ("POST", r"/v4/networking/firewalls", "create_firewall", "_create_firewall"),
        ("GET", r"/v4/networking/firewalls/(\d+)", "get_firewall", "_get_firewall"),
        ("DELETE", r"/v4/networking/firewalls/(\d+)", "delete_firewall", "_delete_firewall"),
    )
    _TIME = "%Y-%m-%dT%H:%M:%S"  # no zone: libcloud parses it with strptime and this exact format

    def __init__(self, **kw):
        super().__init__(**kw)
        self._ids = itertools.count(60000001)
        self._fw_ids = itertools.count(7001)

    def driver(self, key=None, **kwargs):
        from libcloud.compute.drivers.linode import LinodeNodeDriver

        return LinodeNodeDriver(key or self.token, api_version="4.0", secure=False, host="127.0.0.1",
                                port=self.port, **kwargs)

    def _error_body(self, status, ident, message, field=None):
        return {"errors": [dict({"reason": message}, **({"field": field} if field else {}))]}

    @staticmethod
    def _page(items, q):
        """Linode pagination: ?page=&page_size= -> data, page, pages, results."""
        size, page = max(1, int(q.get("page_size", 100))), max(1, int(q.get("page", 1)))
        pages = max(1, -(-len(items) // size))
        return 200, {"data": items[(page - 1) * size : page * size], "page": page, "pages": pages, "results": len(items)}

    def _list_nodes(self, q, data):
        status, body = self._page(list(self.nodes.values()), q)
        for rec in body["data"]:
            self._seen(str(rec["id"]))
        return status, body

    def _create_node(self, q, data):
        ltype = next((t for t in _LINODE_TYPES if t["id"] == data.get("type")), None)
        region = next((r for r in _LINODE_REGIONS if r["id"] == data.get("region")), None)
        if ltype is None:
            raise self._err("invalid", what="A valid plan type by that ID was not found", field="type")
        if region is None:
            raise self._err("invalid", what="region is not valid", field="region")
        if data.get("image") and not any(i["id"] == data["image"] for i in _LINODE_IMAGES):
            raise self._err("invalid", what="image is not valid", field="image")
        if data.get("image") and not data.get("root_pass"):
            raise self._err("invalid", what="root_pass is required when deploying from an image", field="root_pass")
        label = data.get("label") or f"linode{next(self._ids)}"
        if any(n["label"] == label for n in self.nodes.values()):
            raise self._err("invalid", what="Label must be unique among your linodes", field="label")
        tags = data.get("tags") or []
        if any(not isinstance(t, str) or not 3 <= len(t) <= 50 for t in tags):
            raise self._err("invalid", what="Length must be 3-50 characters", field="tags")
        if ltype["class"] == "gpu" and "GPU Linodes" not in region["capabilities"]:
            raise self._err("size_unavailable")
        if len(self.nodes) >= self.max_nodes:
            raise self._err("quota")
        lid = next(self._ids)
        ipv4 = [self._next_ip(str(lid))] + ([f"192.168.{lid % 250}.{lid % 200 + 2}"] if data.get("private_ip") else [])
        rec = {  # shape: linode_v4/create_node.json
            "id": lid, "label": label, "group": "", "status": "provisioning", "created": _now(self._TIME),
            "updated": _now(self._TIME), "type": ltype["id"], "ipv4": ipv4,
            "ipv6": f"2600:3c03::f03c:95ff:fe{lid % 256:02x}:{lid % 65536:04x}/128", "image": data.get("image"),
            "region": region["id"], "tags": list(tags), "hypervisor": "kvm", "watchdog_enabled": True,
            "specs": {k: ltype[k] for k in ("disk", "memory", "vcpus", "gpus", "transfer")},
            "alerts": {"cpu": 90 * ltype["vcpus"], "io": 10000, "network_in": 10, "network_out": 10, "transfer_quota": 80},
            "backups": {"enabled": bool(data.get("backups_enabled")), "last_successful": None,
                        "schedule": {"day": None, "window": None}},
        }
        self._new_node(str(lid), rec)
        return 200, rec

    def _set_status(self, rec, status):
        rec["status"], rec["updated"] = status, _now(self._TIME)

    def _activate(self, key):
        self._set_status(self.nodes[key], "running")

    def _boot(self, lid, q, data):
        self._node(lid)
        self._booting.pop(lid, None)
        self._activate(lid)
        return 200, {}

    def _shutdown(self, lid, q, data):
        self._booting.pop(lid, None)
        self._set_status(self._node(lid), "offline")
        return 200, {}

    def _list_types(self, q, data):
        return self._page(copy.deepcopy(_LINODE_TYPES), q)

    def _list_images(self, q, data):
        return self._page(copy.deepcopy(_LINODE_IMAGES), q)

    def _list_regions(self, q, data):
        return self._page(copy.deepcopy(_LINODE_REGIONS), q)

    # -- firewalls (shape: Linode API v4 "Firewall") -------------------------------------------
    def _list_firewalls(self, q, data):
        return self._page(list(self.firewalls.values()), q)

    def _create_firewall(self, q, data):
        label = data.get("label") or ""
        if not 3 <= len(label) <= 32:
            raise self._err("invalid", what="Length must be 3-32 characters", field="label")
        if any(f["label"] == label for f in self.firewalls.values()):
            raise self._err("invalid", what="Label must be unique", field="label")
        linodes = (data.get("devices") or {}).get("linodes") or []
        missing = [i for i in linodes if str(i) not in self.nodes]
        if missing:
            raise self._err("invalid", what=f"Linode {missing[0]} not found", field="devices.linodes")
        rules = {"inbound": [], "inbound_policy": "ACCEPT", "outbound": [], "outbound_policy": "ACCEPT"}
        rules.update(data.get("rules") or {})
        fid = next(self._fw_ids)
        entities = [{"id": i, "type": "linode", "label": self.nodes[str(i)]["label"], "url": f"/v4/linode/instances/{i}"}
                    for i in linodes]
        self.firewalls[str(fid)] = {"id": fid, "label": label, "created": _now(self._TIME), "updated": _now(self._TIME),
                                    "status": "enabled", "rules": rules, "tags": data.get("tags") or [], "entities": entities}
        return 200, self.firewalls[str(fid)]


# ======================================================================================
# OpenStack: keystone v3, nova 2.1, glance v2, neutron 2.0
# ======================================================================================
PROJECT_ID = "9c4693dce56b493b9b83197d900f7fba"  # as in openstack/_v3__auth.json
USER_ID = "55fba80f022b4855acfc700ae13b2b24"
_NOVA = f"/compute/v2.1/{PROJECT_ID}"
# shape: openstack_v1_1/_flavors_detail.json + the nova 2.1 extension fields
_OS_FLAVORS = [
    {"id": fid, "name": name, "vcpus": vcpus, "ram": ram, "disk": disk, "swap": "", "rxtx_factor": 1.0,
     "OS-FLV-EXT-DATA:ephemeral": 0, "OS-FLV-DISABLED:disabled": False, "os-flavor-access:is_public": True,
     "links": [{"href": f"http://nova.invalid{_NOVA}/flavors/{fid}", "rel": "self"}]}
    for fid, name, vcpus, ram, disk in [("2", "m1.small", 1, 2048, 20), ("4", "m1.large", 4, 8192, 80),
                                        ("a100-1", "g1.a100.1", 12, 87040, 200)]
]
# shape: openstack_v1_1/_images_v2.json
_OS_IMAGES = [
    {"id": iid, "name": name, "status": "active", "visibility": "public", "min_disk": 10, "min_ram": 0,
     "created_at": "2024-01-15T09:12:44Z", "updated_at": "2024-01-15T09:13:30Z", "os_distro": distro,
     "os_version": version, "os_type": "linux", "tags": [], "container_format": "bare", "disk_format": "qcow2",
     "size": size, "virtual_size": size * 3, "protected": False, "owner": PROJECT_ID, "checksum": hashlib.md5(iid.encode()).hexdigest(),
     "self": f"/v2/images/{iid}", "file": f"/v2/images/{iid}/file", "schema": "/v2/schemas/image"}
    for iid, name, distro, version, size in [
        ("6c6b1ea4-8f3c-4a4e-9d0c-2f1a7f6e1a01", "Ubuntu 22.04", "ubuntu", "22.04", 683671552),
        ("0f4e7c6e-2b8e-4f6c-8c1e-5a9d3b2e7d02", "Debian 12", "debian", "12", 348127232),
    ]
]
_NEUTRON_TYPE = {"itemNotFound": "NotFound", "conflictingRequest": "InUse", "badRequest": "BadRequest",
                 "forbidden": "OverQuota", "computeFault": "InternalServerError", "overLimit": "OverLimit"}


class FakeOpenStack(FakeCloud):
    """Also: ``username``/``project``; ``sold_out`` (flavor ids or names with no capacity: a server
    created with one goes to ERROR with nova's "No valid host was found" fault, as a real cloud does)."""

    kind = "openstack"
    STATES = {"running": "ACTIVE", "stopped": "SHUTOFF", "provisioning": "BUILD", "error": "ERROR"}
    WRAP = {"node": "server"}
    ERRORS = {
        "auth": (401, "error", "The request you have made requires authentication."),
        "quota": (403, "forbidden", "Quota exceeded for instances: Requested 1, but already used {used} of {limit} instances"),
        "size_unavailable": (500, "computeFault", "No valid host was found. There are not enough hosts available."),
        "server_error": (500, "computeFault", ("Unexpected API Error. Please report this at "
                                               "http://bugs.launchpad.net/nova/ and attach the Nova API log if possible.")),
        "rate_limit": (429, "overLimit", "This request was rate-limited."),
        "not_found": (404, "itemNotFound", "The resource could not be found."),
        "invalid": (400, "badRequest", "{what}"),
        "conflict": (409, "conflictingRequest", "{what}"),
    }
    ROUTES = (
        ("POST", r"(?:/identity)?/v3/auth/tokens", "auth", "_auth"),  # devstack's /identity, or at the root
        ("GET", _NOVA + r"/servers/detail", "list_nodes", "_list_nodes"),
        ("POST", _NOVA + r"/servers", "create_node", "_create_node"),
        ("GET", _NOVA + r"/servers/([^/]+)", "get_node", "_get_node"),
        ("DELETE", _NOVA + r"/servers/([^/]+)", "destroy_node", "_destroy_node"),
        ("POST", _NOVA + r"/servers/([^/]+)/action", "action", "_node_action"),
        ("GET", _NOVA + r"/flavors/detail", "list_sizes", "_list_flavors"),
        ("GET", _NOVA + r"/os-keypairs", "list_key_pairs", "_list_keys"),
        ("POST", _NOVA + r"/os-keypairs", "create_key_pair", "_create_key"),
        ("DELETE", _NOVA + r"/os-keypairs/([^/]+)", "delete_key_pair", "_delete_key"),
        ("GET", r"/image/v2/images", "list_images", "_list_images"),
        ("GET", r"/network/v2.0/security-groups", "list_firewalls", "_list_sgs"),
        ("POST", r"/network/v2.0/security-groups", "create_firewall", "_create_sg_route"),
        ("DELETE", r"/network/v2.0/security-groups/([^/]+)", "delete_firewall", "_delete_sg"),
        ("POST", r"/network/v2.0/security-group-rules", "create_firewall_rule", "_create_rule"),
        ("DELETE", r"/network/v2.0/security-group-rules/([^/]+)", "delete_firewall_rule", "_delete_rule"),
    )
    _ACTIONS = {"os-stop": "stop_node", "os-start": "start_node", "reboot": "reboot_node"}

    def __init__(self, *, username="demo", project="labdeck", **kw):
        super().__init__(**kw)
        self.username, self.project = username, project
        self.sold_out: set = set()
        self.tokens: set = set()
        self._doomed: set = set()
        self._doom_next = False
        self._n = itertools.count(5)
        self._create_sg("default", "Default security group")

    def driver(self, key=None, **kwargs):
        from libcloud.compute.drivers.openstack import OpenStack_2_NodeDriver

        opts = dict(secure=False, ex_force_auth_url=f"{self.url}/identity", ex_force_auth_version="3.x_password",
                    ex_tenant_name=self.project, ex_domain_name="Default", ex_force_service_region="RegionOne")
        return OpenStack_2_NodeDriver(self.username, key or self.token, **dict(opts, **kwargs))

    def _error_body(self, status, ident, message, field=None):
        if status == 401:  # keystone / keystonemiddleware (fixture openstack/_v3__auth_unauthorized.json)
            return {"error": {"message": message, "code": 401, "title": "Unauthorized"}}
        if self._path.startswith("/network/"):
            return {"NeutronError": {"type": _NEUTRON_TYPE.get(ident, ident), "message": message, "detail": ""}}
        return {ident: {"message": message, "code": status}}

    def _missing(self, key):
        return f"Instance {key} could not be found."

    def _action_op(self, data):
        return next((self._ACTIONS[k] for k in data if k in self._ACTIONS), "node_action")

    def _check_auth(self, headers, op):
        if op != "auth" and headers.get("X-Auth-Token") not in self.tokens:
            raise self._err("auth")

    def _inject(self, op, kind):
        if op == "create_node" and kind == "size_unavailable":
            self._doom_next = True  # nova accepts the request; the server goes to ERROR
            return
        raise self._err(kind, used=len(self.nodes), limit=self.max_nodes)

    # -- keystone ---------------------------------------------------------------------------
    def _auth(self, q, data):
        ident = data.get("auth", {}).get("identity", {})
        user = ident.get("password", {}).get("user", {})
        scope = data.get("auth", {}).get("scope", {}).get("project", {})
        if (user.get("name"), user.get("password"), scope.get("name")) != (self.username, self.token, self.project):
            raise self._err("auth")
        token = "gAAAAAB" + uuid.uuid4().hex
        self.tokens.add(token)
        base = self.url
        catalog = [  # shape: openstack/_v3__auth.json, names/region as libcloud's connections look them up
            {"type": t, "name": n, "id": uuid.uuid5(uuid.NAMESPACE_URL, t).hex,
             "endpoints": [{"id": uuid.uuid5(uuid.NAMESPACE_URL, t + i).hex, "interface": i, "region": "RegionOne",
                            "region_id": "RegionOne", "url": base + path} for i in ("public", "internal", "admin")]}
            for t, n, path in [("identity", "keystone", "/identity"), ("compute", "nova", _NOVA),
                               ("image", "glance", "/image"), ("network", "neutron", "/network")]
        ]
        now = datetime.now(UTC)
        body = {"token": {
            "methods": ["password"], "roles": [{"id": "9fe2ff9ee4384b1894a90878d3e92bab", "name": "member"}],
            "expires_at": (now + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
            "issued_at": now.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), "audit_ids": [uuid.uuid4().hex[:22]],
            "project": {"domain": {"id": "default", "name": "Default"}, "id": PROJECT_ID, "name": self.project},
            "user": {"domain": {"id": "default", "name": "Default"}, "id": USER_ID, "name": self.username},
            "catalog": catalog, "extras": {}, "is_domain": False,
        }}
        return 201, body, {"X-Subject-Token": token}

    # -- nova servers -----------------------------------------------------------------------
    def _list_nodes(self, q, data):
        for k in list(self.nodes):
            self._seen(k)
        return 200, {"servers": list(self.nodes.values())}

    def _create_node(self, q, data):
        s = data.get("server") or {}
        flavor = next((f for f in _OS_FLAVORS if f["id"] == s.get("flavorRef")), None)
        if flavor is None:
            raise self._err("invalid", what=f"Flavor {s.get('flavorRef')} could not be found.")
        if not any(i["id"] == s.get("imageRef") for i in _OS_IMAGES):
            raise self._err("invalid", what=f"Image {s.get('imageRef')} could not be found.")
        if s.get("key_name") and s["key_name"] not in self.keys:
            raise self._err("invalid", what="Invalid key_name provided.")
        groups = [g["name"] for g in s.get("security_groups") or [{"name": "default"}]]
        known = {g["name"] for g in self.firewalls.values()}
        for g in groups:
            if g not in known:
                raise self._err("invalid", what=f"Security group {g} not found.")
        meta = s.get("metadata") or {}
        bad = [k for k, v in meta.items() if not isinstance(v, str) or len(k) > 255 or len(v) > 255]
        if bad:
            raise self._err("invalid", what=f"Invalid input for field/attribute metadata. Value: {meta}. "
                            f"{meta[bad[0]]!r} is not of type 'string'")
        if len(self.nodes) >= self.max_nodes:
            raise self._err("quota", used=len(self.nodes), limit=self.max_nodes)
        sid, now = str(uuid.uuid4()), _now()
        link = f"{self.url}{_NOVA}/servers/{sid}"
        rec = {  # shape: openstack_v1_1/_servers_detail.json (nova 2.1, a server being built)
            "id": sid, "name": s.get("name"), "status": "BUILD", "tenant_id": PROJECT_ID, "user_id": USER_ID,
            "metadata": dict(meta), "hostId": "", "created": now, "updated": now, "addresses": {},
            "image": {"id": s["imageRef"], "links": [{"href": f"{self.url}/images/{s['imageRef']}", "rel": "bookmark"}]},
            "flavor": {"id": flavor["id"], "links": [{"href": f"{self.url}/flavors/{flavor['id']}", "rel": "bookmark"}]},
            "accessIPv4": "", "accessIPv6": "", "links": [{"href": link, "rel": "self"}, {"href": link, "rel": "bookmark"}],
            "OS-DCF:diskConfig": "MANUAL", "progress": 0, "OS-EXT-AZ:availability_zone": "nova", "config_drive": "",
            "key_name": s.get("key_name"), "security_groups": [{"name": g} for g in groups],
            "OS-EXT-STS:task_state": "scheduling", "OS-EXT-STS:vm_state": "building", "OS-EXT-STS:power_state": 0,
            "os-extended-volumes:volumes_attached": [], "OS-SRV-USG:launched_at": None, "OS-SRV-USG:terminated_at": None,
        }
        self._new_node(sid, rec)
        self._next_ip(sid)
        if self._doom_next or flavor["id"] in self.sold_out or flavor["name"] in self.sold_out:
            self._doomed.add(sid)
        self._doom_next = False
        reply = {"id": sid, "links": rec["links"], "OS-DCF:diskConfig": "MANUAL",
                 "security_groups": rec["security_groups"], "adminPass": uuid.uuid4().hex[:12]}
        return 202, {"server": reply}  # shape: openstack_v1_1/_servers_create.json

    def _activate(self, key):
        rec = self.nodes[key]
        if key in self._doomed:
            status, self._doomed = "ERROR", self._doomed - {key}
            rec["fault"] = {"code": 500, "created": _now(), "message": self.ERRORS["size_unavailable"][2]}
        else:
            status = "ACTIVE"
            mac = "fa:16:3e:" + ":".join(f"{b:02x}" for b in hashlib.md5(key.encode()).digest()[:3])
            rec["addresses"] = {
                "public": [{"version": 4, "addr": self._ip[key], "OS-EXT-IPS:type": "fixed", "OS-EXT-IPS-MAC:mac_addr": mac}],
                "private": [{"version": 4, "addr": f"10.0.0.{next(self._n) % 250 + 3}", "OS-EXT-IPS:type": "fixed",
                             "OS-EXT-IPS-MAC:mac_addr": mac}],
            }
            rec["hostId"] = hashlib.sha224(f"{PROJECT_ID}{key}".encode()).hexdigest()
            rec["OS-SRV-USG:launched_at"] = _now("%Y-%m-%dT%H:%M:%S.000000")
        self._set_status(rec, status)

    def _set_status(self, rec, status):
        vm, power = {"ACTIVE": ("active", 1), "SHUTOFF": ("stopped", 4), "BUILD": ("building", 0),
                     "ERROR": ("error", 0)}.get(status, (status.lower(), 0))
        rec.update({"status": status, "updated": _now(), "OS-EXT-STS:vm_state": vm, "OS-EXT-STS:power_state": power,
                    "OS-EXT-STS:task_state": "scheduling" if status == "BUILD" else None})

    def _node_action(self, sid, q, data):
        rec, action = self._node(sid), next(iter(data), None)
        need = {"os-stop": "ACTIVE", "os-start": "SHUTOFF", "reboot": "ACTIVE"}.get(action)
        if need is None:
            raise self._err("invalid", what=f"There is no such action: {action}")
        if rec["status"] != need:
            verb = action.replace("os-", "")
            raise self._err("conflict", what=f"Cannot '{verb}' instance {sid} while it is in vm_state "
                            f"{rec['OS-EXT-STS:vm_state']}")
        if action == "os-stop":
            self._set_status(rec, "SHUTOFF")
        elif action == "os-start":
            self._set_status(rec, "ACTIVE")
        return 202, None

    def _list_flavors(self, q, data):
        return 200, {"flavors": copy.deepcopy(_OS_FLAVORS)}

    def _list_images(self, q, data):
        return 200, {"images": copy.deepcopy(_OS_IMAGES), "first": "/v2/images", "schema": "/v2/schemas/images"}

    # -- nova keypairs (shape: openstack_v1_1/_os_keypairs.json, _os_keypairs_create_import.json)
    def _list_keys(self, q, data):
        return 200, {"keypairs": [{"keypair": {k: v for k, v in kp.items() if k != "user_id"}} for kp in self.keys.values()]}

    def _create_key(self, q, data):
        kp = data.get("keypair") or {}
        name = kp.get("name") or ""
        if not kp.get("public_key"):
            raise self._err("invalid", what="This fake imports key pairs only (pass public_key).")
        fp = ssh_fingerprint(kp["public_key"])
        if fp is None:
            raise self._err("invalid", what="Keypair data is invalid: failed to generate fingerprint")
        if name in self.keys:
            raise self._err("conflict", what=f"Key pair '{name}' already exists.")
        self.keys[name] = {"name": name, "public_key": kp["public_key"], "fingerprint": fp, "type": "ssh", "user_id": USER_ID}
        return 200, {"keypair": self.keys[name]}

    def _delete_key(self, name, q, data):
        if self.keys.pop(name, None) is None:
            raise self._err("not_found", f"Keypair {name} not found for user {USER_ID}")
        return 202, None

    # -- neutron security groups (shape: openstack_v1_1/_v2_0__security_group*.json) ----------------
    def _rule(self, sg_id, direction, protocol=None, lo=None, hi=None, prefix=None, group=None, ethertype="IPv4"):
        return {"id": str(uuid.uuid4()), "security_group_id": sg_id, "direction": direction, "ethertype": ethertype,
                "protocol": protocol, "port_range_min": lo, "port_range_max": hi, "remote_ip_prefix": prefix,
                "remote_group_id": group, "tenant_id": PROJECT_ID, "project_id": PROJECT_ID, "description": "",
                "created_at": _now(), "updated_at": _now(), "revision_number": 0}

    def _create_sg(self, name, description):
        gid = str(uuid.uuid4())
        rules = [self._rule(gid, "egress"), self._rule(gid, "egress", ethertype="IPv6")]
        self.firewalls[gid] = {"id": gid, "name": name, "description": description, "tenant_id": PROJECT_ID,
                               "project_id": PROJECT_ID, "security_group_rules": rules, "tags": [], "stateful": True,
                               "created_at": _now(), "updated_at": _now(), "revision_number": 1}
        return self.firewalls[gid]

    def _list_sgs(self, q, data):
        return 200, {"security_groups": list(self.firewalls.values())}

    def _create_sg_route(self, q, data):
        sg = data.get("security_group") or {}
        return 201, {"security_group": self._create_sg(sg.get("name") or "", sg.get("description") or "")}

    def _delete_sg(self, gid, q, data):
        if gid not in self.firewalls:
            raise self._err("not_found", f"Security group {gid} does not exist")
        name = self.firewalls[gid]["name"]
        if name == "default":
            raise self._err("conflict", what="Insufficient rights for removing default security group.")
        if any({"name": name} in n["security_groups"] for n in self.nodes.values()):
            raise self._err("conflict", what=f"Security Group {gid} in use.")
        del self.firewalls[gid]
        return 204, None

    def _create_rule(self, q, data):
        r = data.get("security_group_rule") or {}
        sg = self.firewalls.get(r.get("security_group_id"))
        if sg is None:
            raise self._err("not_found", f"Security group {r.get('security_group_id')} does not exist")
        rule = self._rule(sg["id"], r.get("direction", "ingress"), r.get("protocol"), r.get("port_range_min"),
                          r.get("port_range_max"), r.get("remote_ip_prefix"), r.get("remote_group_id"),
                          r.get("ethertype", "IPv4"))
        sg["security_group_rules"].append(rule)
        sg["revision_number"] += 1
        return 201, {"security_group_rule": rule}

    def _delete_rule(self, rid, q, data):
        for sg in self.firewalls.values():
            for rule in sg["security_group_rules"]:
                if rule["id"] == rid:
                    sg["security_group_rules"].remove(rule)
                    return 204, None
        raise self._err("not_found", f"Security group rule {rid} does not exist")
