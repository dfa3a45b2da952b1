"""Cloud providers, through apache-libcloud's real drivers: AWS EC2, DigitalOcean, Linode, OpenStack.

    [providers.aws]
    type = "ec2"
    region = "us-east-1"
    profile = "default"               # ~/.aws/credentials (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)
    ssh_key = "~/.ssh/id_ed25519"     # its .pub is imported to the provider; the private key never leaves
    jump = ["bastion"]                # reach the instances through the team's jump host
    address = "private"               # which address to SSH to (private: through the jump host)
    autostop_minutes = 30
    daily_budget is in [budget]

Credentials are read from each provider's usual place every time a driver is made (environment
variables, then the provider's own credentials file); the config only names which profile or
variable. They are never written to the store, the logs or the screen.

Every libcloud call blocks, so each runs in a thread under ``api_timeout``. A provider's errors
come back as :class:`ProviderError` with the provider's own words and what to do (bad
credentials, quota, a size not offered in the region, no answer).

What labdeck launches carries tags ``labdeck-owner``, ``labdeck-id`` and ``labdeck-name``. Instances
without them were made outside labdeck: they are listed (with their cost where the size is known)
but never stopped, started or terminated unless forced.
"""

from __future__ import annotations

import abc
import asyncio
import configparser
import os
import re
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from ..catalog import Catalog, SizeInfo, ec2_shape
from ..config import Field
from ..errors import LabdeckError, ProviderError
from ..models import Instance
from ..ssh import HostSpec, SSHConfig, SSHPool, SSHTransport, resolve_host
from .base import InstanceSpec, Provider, Transport

TAG_OWNER, TAG_ID, TAG_NAME = "labdeck-owner", "labdeck-id", "labdeck-name"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")

Progress = Callable[[str, str], None]


def _pos(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _nonneg(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _cidr(v: Any) -> str | None:
    if not v:
        return None
    import ipaddress

    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        return "must be an address or CIDR block, e.g. 203.0.113.7/32"
    return None


def _endpoint(v: Any) -> str | None:
    if not v:
        return None
    u = urlparse(v)
    return None if u.scheme in ("http", "https") and u.hostname else "must be a URL such as https://api.example.com:443"


def _prices(v: Any) -> str | None:
    return None if all(isinstance(x, (int, float)) and x >= 0 for x in v.values()) else "must map size names to $/hr"


DEFAULTS: dict[str, dict[str, Any]] = {
    "ec2": {"region": "us-east-1", "ssh_user": "ubuntu", "size": "g4dn.xlarge",
            "image": "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*"},
    "digitalocean": {"region": "nyc2", "ssh_user": "root", "size": "gpu-h100x1-80gb", "image": "gpu-h100x1-base"},
    "linode": {"region": "us-east", "ssh_user": "root", "size": "g1-gpu-rtx6000-1", "image": "linode/ubuntu22.04"},
    "openstack": {"region": "RegionOne", "ssh_user": "ubuntu", "size": "", "image": "Ubuntu 22.04"},
}

CREDENTIAL_HINTS = {
    "ec2": "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a [profile] in ~/.aws/credentials "
           "(`profile` in the provider's config chooses which).",
    "digitalocean": "Set DIGITALOCEAN_TOKEN (or the variable named by `token_env`), or log in with `doctl auth init`.",
    "linode": "Set LINODE_TOKEN (or the variable named by `token_env`), or configure `linode-cli`.",
    "openstack": "Source your project's openrc file (OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME).",
}


def config_fields(ptype: str) -> dict[str, Field]:
    d = DEFAULTS[ptype]
    fields: dict[str, Field] = {
        "region": Field(str, d["region"], "Region (EC2 us-east-1, DigitalOcean nyc2, Linode us-east, OpenStack RegionOne)"),
        "endpoint": Field(str, "", "API endpoint URL, for private clouds and proxies ('' = the provider's own; "
                                   "for OpenStack the Keystone URL, default OS_AUTH_URL)", _endpoint),
        "credentials_file": Field(str, "", "The provider's credentials file ('' = its usual place)"),
        "image": Field(str, d["image"], "Default image: id, slug or name (EC2: an AMI id or a name pattern)"),
        "size": Field(str, d["size"], "Default size for `labdeck up`"),
        "disk_gb": Field(int, 100, "Boot disk in GB (where the provider lets labdeck choose)", _pos),
        "ssh_user": Field(str, d["ssh_user"], "User labdeck logs in as ('' = from ssh_config by instance name)"),
        "ssh_config": Field(str, "~/.ssh/config", "OpenSSH client config for jump hosts and per-instance settings ('' for none)"),
        "ssh_key": Field(str, "", "Private key to log in with; its .pub is imported to the provider "
                                  "('' = ~/.ssh/id_ed25519, else ~/.ssh/id_rsa)"),
        "jump": Field(list, [], "Jump hosts to reach the instances through, first to last",
                      lambda v: None if all(isinstance(x, str) and x for x in v) else "must be a list of host names"),
        "address": Field(str, "public", "Address labdeck SSHes to: public or private (private needs `jump`)",
                         lambda v: None if v in ("public", "private") else "must be public or private"),
        "ssh_from": Field(str, "", "Address or CIDR allowed to SSH in ('' = the jump host's address when it is an "
                                   "IP, else this machine's SSH server address, else anywhere)", _cidr),
        "api_timeout": Field((int, float), 20.0, "Seconds to wait for one API call", _pos),
        "launch_timeout": Field((int, float), 600.0, "Seconds to wait for a new instance to run", _pos),
        "ssh_timeout": Field((int, float), 300.0, "Seconds to wait for SSH on a new instance", _pos),
        "connect_timeout": Field((int, float), 5.0, "Seconds to wait for an SSH answer", _pos),
        "autostop_minutes": Field((int, float), 60, "Idle minutes before an instance stops itself (0 = never)", _nonneg),
        "autostop_action": Field(str, "stop", "What autostop does: stop or terminate",
                                 lambda v: None if v in ("stop", "terminate") else "must be stop or terminate"),
        "spot_relaunch": Field(bool, False, "Relaunch runs of a preempted instance on a new one, from their last checkpoint"),
        "runs_dir": Field(str, "~/.labdeck/runs", "Where run directories go on the instances"),
        "max_concurrent": Field(int, 1, "Jobs run at once per instance (the rest queue)",
                                lambda v: None if v >= 1 else "must be 1 or more"),
        "prices": Field(dict, {}, "$/hr per size, overriding every other price (negotiated rates)", _prices),
        "poll_seconds": Field((int, float), 3.0, "Seconds between state checks while launching", _pos),
    }
    if ptype == "ec2":
        fields["profile"] = Field(str, "", "Profile in ~/.aws/credentials ('' = AWS_PROFILE, else default; "
                                           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY win when set)")
    if ptype in ("digitalocean", "linode"):
        fields["token_env"] = Field(str, "", "Environment variable holding the API token "
                                             f"('' = {'DIGITALOCEAN_TOKEN' if ptype == 'digitalocean' else 'LINODE_TOKEN'})")
    if ptype == "openstack":
        fields["project"] = Field(str, "", "Project ('' = OS_PROJECT_NAME)")
        fields["domain"] = Field(str, "", "User domain ('' = OS_USER_DOMAIN_NAME, else Default)")
    return fields


# ---- errors ---------------------------------------------------------------------------------

def explain(provider: str, ptype: str, e: BaseException, doing: str) -> ProviderError:
    """A provider's exception as one clear message and what to do."""
    from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
    from libcloud.common.types import InvalidCredsError

    text = str(e).strip() or type(e).__name__
    low = text.lower()
    if isinstance(e, ProviderError):
        return e
    if "unsupportedoperation" in low:
        return ProviderError(f"{provider}: the provider refused {doing}: {text[:300]}")
    if "unsupported" in low or "not available" in low or "not offered" in low or "invalid size" in low \
            or "insufficientinstancecapacity" in low or "is not valid for region" in low \
            or "no valid host" in low or "not currently available" in low:
        return ProviderError(f"{provider}: that size is not available there ({text[:300]}).",
                             "Pick another size or region: `labdeck sizes PROVIDER` lists what is offered.")
    if isinstance(e, InvalidCredsError) or "authfailure" in low or "unauthorized" in low or "invalid token" in low \
            or "signaturedoesnotmatch" in low or getattr(e, "code", None) == 401:
        return ProviderError(f"{provider}: the credentials were refused while {doing} ({text[:200]}).",
                             CREDENTIAL_HINTS[ptype])
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) or "timed out" in low or "timeout" in type(e).__name__.lower():
        return ProviderError(f"{provider}: the API did not answer while {doing}.",
                             "Check the network to the provider; `api_timeout` in the config sets how long labdeck waits.")
    if "quota" in low or "limit" in low and ("exceed" in low or "reached" in low) or "instancelimitexceeded" in low \
            or "vcpulimitexceeded" in low or isinstance(e, RateLimitReachedError):
        return ProviderError(f"{provider}: over the account's quota while {doing} ({text[:300]}).",
                             "Stop or terminate instances you do not need, or ask the provider for a higher limit.")
    if isinstance(e, (ConnectionError, OSError)):
        return ProviderError(f"{provider}: cannot reach the API while {doing} ({text[:200]}).",
                             "Check the network and the provider's `endpoint`.")
    if isinstance(e, BaseHTTPError):
        return ProviderError(f"{provider}: the API refused {doing}: {text[:300]}")
    return ProviderError(f"{provider}: {doing} failed: {type(e).__name__}: {text[:300]}")


def _tags_from_list(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in items or []:
        if isinstance(t, str):
            k, _, v = t.partition(":")
            out[k] = v
    return out


def _tags_to_list(tags: Mapping[str, str]) -> list[str]:
    """key:value strings in DigitalOcean's tag alphabet (letters, digits, : - _) and within Linode's 50
    characters."""
    return [re.sub(r"[^A-Za-z0-9:_-]", "-", f"{k}:{v}" if v else k)[:50] for k, v in tags.items()]


STATE_MAP = {"running": "running", "stopped": "stopped", "pending": "pending", "starting": "pending",
             "rebooting": "pending", "reconfiguring": "pending", "updating": "pending", "migrating": "pending",
             "stopping": "stopping", "terminated": "terminated", "suspended": "stopped", "paused": "stopped",
             "error": "error", "normal": "running", "unknown": "unknown"}


# ---- one adapter per provider type: the blocking libcloud calls -----------------------------

def firewall_tag(labdeck_id: str) -> str:
    return f"labdeck-{labdeck_id.lower()}"


def firewall_name(instance: str, labdeck_id: str) -> str:
    """The firewall labdeck makes for an instance: found again by this name after a restart (≤ 32
    characters: Linode's limit for a label)."""
    return f"labdeck-{instance[:16]}-{labdeck_id[-6:].lower()}"


class CloudAPI(abc.ABC):
    """One provider's blocking libcloud calls. Subclasses give the driver, the firewall and the node
    creation; keys are imported by name and a missing node reads as None unless they say otherwise."""

    ptype = ""

    def __init__(self, provider: str, options: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.provider = provider
        self.options = options
        self.env = env
        self.region = str(options["region"])
        self._driver = None
        import threading

        self.lock = threading.Lock()  # libcloud connections keep per-request state: one call at a time

    # credentials / driver
    def missing_credentials(self, what: str) -> ProviderError:
        return ProviderError(f"{self.provider}: no {self.ptype} credentials found ({what}).", CREDENTIAL_HINTS[self.ptype])

    def endpoint_kwargs(self) -> dict[str, Any]:
        ep = self.options.get("endpoint") or ""
        if not ep:
            return {}
        u = urlparse(ep)
        return {"host": u.hostname, "port": u.port or (443 if u.scheme == "https" else 80), "secure": u.scheme == "https"}

    def driver(self):
        if self._driver is None:
            self._driver = self.make_driver()
            conn = getattr(self._driver, "connection", None)
            if conn is not None:
                conn.timeout = float(self.options["api_timeout"])
        return self._driver

    @abc.abstractmethod
    def make_driver(self): ...

    def token(self, default_vars: tuple[str, ...], cli_file: str, pattern: str) -> str:
        """An API token: the variable `token_env` names (else ``default_vars``), else the provider
        CLI's config file (``pattern`` captures it)."""
        var = self.options.get("token_env")
        for v in ((var,) if var else default_vars):
            if self.env.get(v):
                return self.env[v]
        path = Path(os.path.expanduser(self.options.get("credentials_file") or cli_file))
        try:
            m = re.search(pattern, path.read_text(), re.M)
        except OSError:
            m = None
        if m:
            return m.group(1).strip().strip("'\"")
        raise self.missing_credentials(f"no {' or '.join((var,) if var else default_vars)} and no token in {path}")

    # nodes
    def list_nodes(self) -> list:
        return self.driver().list_nodes()

    def tags(self, node) -> dict[str, str]:
        return _tags_from_list(node.extra.get("tags"))

    def size_of(self, node) -> str:
        s = node.size
        return str(getattr(s, "id", s) or node.extra.get("size_slug") or "")

    def spot(self, node) -> bool:
        return False

    def shut_down_inside(self, node) -> tuple[bool, str | None]:
        """Whether the machine was shut down from its own operating system (autostop, or someone's
        ``poweroff``), not taken by the provider; and when, if the provider says. These providers never
        stop a machine themselves (no spot market), so a stopped one was shut down by someone."""
        return STATE_MAP.get(str(getattr(node.state, "value", node.state)).lower()) == "stopped", None

    def started(self, node) -> str | None:
        c = node.created_at
        if isinstance(c, datetime):
            c = c if c.tzinfo else c.replace(tzinfo=timezone.utc)
            return c.isoformat(timespec="seconds").replace("+00:00", "Z")
        return None

    def get_node(self, node_id: str):
        """The node, or None when the provider no longer has it (a 404)."""
        from libcloud.common.exceptions import BaseHTTPError

        try:
            return self.fetch_node(node_id)
        except BaseHTTPError as e:
            if getattr(e, "code", None) == 404:
                return None
            raise

    def fetch_node(self, node_id: str):
        for n in self.list_nodes():
            if str(n.id) == str(node_id):
                return n
        return None

    # catalog
    def sizes(self) -> dict[str, dict[str, Any]]:
        """size id -> what the API says about it (vcpus, ram_mib, gpus, price, regions)."""
        out = {}
        for s in self.driver().list_sizes():
            out[str(s.id)] = {"vcpus": s.extra.get("vcpus"), "ram_mib": s.ram, "price": s.price,
                              "gpus": s.extra.get("gpus"), "regions": s.extra.get("regions")}
        return out

    # launch pieces (each returns what cleanup needs)
    def ensure_key(self, name: str, public_key: str) -> tuple[Any, bool]:
        """The key pair called ``name``, imported unless there: (ref, imported by this call)."""
        d = self.driver()
        if any(k.name == name for k in d.list_key_pairs()):
            return name, False
        d.import_key_pair_from_string(name, public_key)
        return name, True

    def delete_key(self, ref: Any) -> None:
        d = self.driver()
        for k in d.list_key_pairs():
            if k.name == ref:
                d.delete_key_pair(k)

    @abc.abstractmethod
    def create_firewall(self, name: str, cidr: str, tag: str) -> Any:
        """A firewall letting only SSH in from ``cidr``; ``tag`` is what it applies to, where it goes by tags."""

    def attach_firewall(self, ref: Any, node) -> Any:
        """Providers whose firewalls attach to a node after it exists."""
        return ref

    @abc.abstractmethod
    def find_firewall(self, name: str) -> Any:
        """The firewall called ``name`` (a ref for delete_firewall), or None."""

    @abc.abstractmethod
    def delete_firewall(self, ref: Any) -> None: ...

    @abc.abstractmethod
    def create_node(self, *, name: str, size: str, image: str, key: Any, firewall: Any, tags: dict[str, str],
                    spot: bool, disk_gb: int, terminate_on_shutdown: bool): ...

    def start(self, node) -> None:
        self.driver().start_node(node)

    def stop(self, node) -> None:
        self.driver().stop_node(node)

    def destroy(self, node) -> None:
        self.driver().destroy_node(node)


class EC2API(CloudAPI):
    ptype = "ec2"

    def make_driver(self):
        from libcloud.compute.drivers.ec2 import EC2NodeDriver

        key, secret, token = self.env.get("AWS_ACCESS_KEY_ID"), self.env.get("AWS_SECRET_ACCESS_KEY"), \
            self.env.get("AWS_SESSION_TOKEN")
        if not (key and secret):
            path = Path(os.path.expanduser(self.options.get("credentials_file") or self.env.get(
                "AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"))
            profile = self.options.get("profile") or self.env.get("AWS_PROFILE") or "default"
            cp = configparser.ConfigParser()
            try:
                cp.read_string(path.read_text())
            except OSError as e:
                raise self.missing_credentials(f"no AWS_ACCESS_KEY_ID, and {path} is unreadable: {e.strerror}") from None
            except configparser.Error as e:  # its message quotes the line: it may hold a secret
                line = getattr(e, "lineno", None) or next(iter(getattr(e, "errors", None) or []), (None,))[0]
                raise self.missing_credentials(f"no AWS_ACCESS_KEY_ID, and {path} does not parse "
                                               f"({type(e).__name__}{f' at line {line}' if line else ''})") from None
            if not cp.has_section(profile):
                raise self.missing_credentials(f"no AWS_ACCESS_KEY_ID, and no [{profile}] in {path}")
            key, secret = cp.get(profile, "aws_access_key_id", fallback=None), cp.get(profile, "aws_secret_access_key", fallback=None)
            token = cp.get(profile, "aws_session_token", fallback=None)
            if not (key and secret):
                raise self.missing_credentials(f"[{profile}] in {path} lacks aws_access_key_id/aws_secret_access_key")
        from libcloud.compute.drivers.ec2 import NAMESPACE
        from libcloud.utils.xml import findtext

        class Driver(EC2NodeDriver):
            def _to_node(self, element):  # + why it last changed state: EC2 tells an OS shutdown from a spot reclaim
                node = super()._to_node(element)
                node.extra["state_reason_code"] = findtext(element=element, xpath="stateReason/code", namespace=NAMESPACE)
                return node

        return Driver(key, secret, region=self.region, token=token, signature_version="4", **self.endpoint_kwargs())

    def tags(self, node) -> dict[str, str]:
        return dict(node.extra.get("tags") or {})

    def size_of(self, node) -> str:
        return str(node.extra.get("instance_type") or "")

    def spot(self, node) -> bool:
        return node.extra.get("instance_lifecycle") == "spot"

    def shut_down_inside(self, node) -> tuple[bool, str | None]:
        # Client.InstanceInitiatedShutdown: `shutdown -h` on the instance (stopped or terminated by its
        # shutdown behaviour); a spot reclaim is Server.Spot*, an API stop Client.UserInitiatedShutdown
        if node.extra.get("state_reason_code") != "Client.InstanceInitiatedShutdown":
            return False, None
        m = re.search(r"\((\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d) (?:GMT|UTC)\)", str(node.extra.get("reason") or ""))
        return True, (f"{m.group(1)}T{m.group(2)}Z" if m else None)

    def started(self, node) -> str | None:
        t = node.extra.get("launch_time")
        return str(t).replace(".000Z", "Z") if t else super().started(node)

    def fetch_node(self, node_id: str):
        nodes = self.driver().list_nodes(ex_node_ids=[node_id])
        return nodes[0] if nodes else None

    def sizes(self) -> dict[str, dict[str, Any]]:
        # libcloud's offline region table: which sizes each region offers (no API call needed)
        from libcloud.compute.constants.ec2_region_details_complete import REGION_DETAILS

        region = REGION_DETAILS.get(self.region)
        if region is None:
            raise ProviderError(f"{self.provider}: unknown EC2 region {self.region!r}.",
                                "Set `region` to an AWS region name such as us-east-1.")
        out = {}
        for sid in region["instance_types"]:
            vcpus, ram = ec2_shape(sid)
            out[sid] = {"vcpus": vcpus, "ram_mib": ram}
        return out

    def image(self, wanted: str):
        from libcloud.compute.base import NodeImage

        d = self.driver()
        if wanted.startswith("ami-"):
            return NodeImage(wanted, wanted, d)
        images = d.list_images(ex_owner="amazon", ex_filters={"name": wanted})
        if not images:
            raise ProviderError(f"{self.provider}: no AMI named {wanted!r} in {self.region}.",
                                "Set `image` to an AMI id (ami-...) or another name pattern.")
        images.sort(key=lambda i: str(i.extra.get("creation_date") or ""), reverse=True)
        return images[0]

    def create_firewall(self, name: str, cidr: str, tag: str) -> Any:
        d = self.driver()
        sg = d.ex_create_security_group(name, "labdeck: SSH only")
        gid = sg.get("group_id")
        if not gid:
            raise ProviderError(f"{self.provider}: creating security group {name} returned no id.")
        self._sg_names = {**getattr(self, "_sg_names", {}), gid: name}
        d.ex_authorize_security_group_ingress(gid, 22, 22, cidr_ips=[cidr])
        return gid

    def delete_firewall(self, ref: Any) -> None:
        self.driver().ex_delete_security_group_by_id(ref)

    def find_firewall(self, name: str) -> Any:
        groups = self.driver().ex_get_security_groups(filters={"group-name": name})
        return groups[0].id if groups else None

    def create_node(self, *, name, size, image, key, firewall, tags, spot, disk_gb, terminate_on_shutdown):
        from libcloud.compute.base import NodeSize

        d = self.driver()
        img = self.image(image)
        kwargs: dict[str, Any] = {
            "name": name, "size": NodeSize(size, size, 0, 0, 0, 0, d), "image": img, "ex_keyname": key,
            # by name: group ids are only accepted together with a subnet; names work in the default VPC
            "ex_security_groups": [self._sg_names[firewall]] if firewall else None, "ex_metadata": tags,
            "ex_blockdevicemappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": disk_gb,
                                                                          "DeleteOnTermination": "true"}}],
            "ex_terminate_on_shutdown": terminate_on_shutdown,
        }
        if spot:
            kwargs["ex_spot"] = True
        kwargs["ex_clienttoken"] = tags.get(TAG_ID)  # a retried RunInstances makes no second instance
        return d.create_node(**kwargs)


class DigitalOceanAPI(CloudAPI):
    ptype = "digitalocean"

    def make_driver(self):
        from libcloud.compute.drivers.digitalocean import DigitalOceanNodeDriver

        tok = self.token(("DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN"), "~/.config/doctl/config.yaml",
                         r"^access-token:\s*(\S+)")
        # (libcloud's v2 class loses its key in __new__, and the base ignores host/port/secure here:
        # point the connection at the endpoint by hand)
        d = DigitalOceanNodeDriver(tok)
        ep = self.endpoint_kwargs()
        if ep:
            d.connection.host, d.connection.port, d.connection.secure = ep["host"], ep["port"], ep["secure"]
            d.connection.timeout = float(self.options["api_timeout"])
            d.connection.connect()
        return d

    def ensure_key(self, name, public_key):
        d = self.driver()
        for k in d.list_key_pairs():
            if k.public_key.split()[:2] == public_key.split()[:2]:
                return k.extra["id"], False
        k = d.create_key_pair(name, public_key)
        return k.extra["id"], True

    def delete_key(self, ref):
        d = self.driver()
        for k in d.list_key_pairs():
            if k.extra.get("id") == ref:
                d.delete_key_pair(k)

    def create_firewall(self, name, cidr, tag):
        import json

        body = {"name": name, "tags": [tag],
                "inbound_rules": [{"protocol": "tcp", "ports": "22", "sources": {"addresses": [cidr]}}],
                "outbound_rules": [{"protocol": p, "ports": "all" if p != "icmp" else "",
                                    "destinations": {"addresses": ["0.0.0.0/0", "::/0"]}} for p in ("tcp", "udp", "icmp")]}
        res = self.driver().connection.request("/v2/firewalls", data=json.dumps(body), method="POST")
        return res.object["firewall"]["id"]

    def delete_firewall(self, ref):
        self.driver().connection.request(f"/v2/firewalls/{ref}", method="DELETE")

    def find_firewall(self, name):
        res = self.driver().connection.request("/v2/firewalls", params={"per_page": 200})
        return next((f["id"] for f in res.object.get("firewalls", []) if f.get("name") == name), None)

    def create_node(self, *, name, size, image, key, firewall, tags, spot, disk_gb, terminate_on_shutdown):
        from libcloud.compute.base import NodeImage, NodeLocation, NodeSize

        d = self.driver()
        # the firewall applies to droplets carrying its tag (firewall_tag): the droplet gets it at birth
        return d.create_node(name, NodeSize(size, size, 0, 0, 0, 0, d), NodeImage(image, image, d),
                             NodeLocation(self.region, self.region, None, d),
                             ex_create_attr={"tags": _tags_to_list(tags) + [firewall_tag(tags[TAG_ID])],
                                             "ssh_keys": [key]})

    def start(self, node):
        self.driver().ex_power_on_node(node)

    def stop(self, node):
        self.driver().ex_shutdown_node(node)

    def fetch_node(self, node_id):
        return self.driver().ex_get_node_details(node_id)

    def sizes(self):
        out = super().sizes()
        for info in out.values():
            info["gpus"] = None  # DigitalOcean's size listing has no GPU count: the catalog and the slug say
        return out


class LinodeAPI(CloudAPI):
    ptype = "linode"

    def make_driver(self):
        from libcloud.compute.drivers.linode import LinodeNodeDriver

        tok = self.token(("LINODE_TOKEN", "LINODE_CLI_TOKEN"), "~/.config/linode-cli", r"^token\s*=\s*(\S+)")
        return LinodeNodeDriver(tok, api_version="4.0", **self.endpoint_kwargs())

    def size_of(self, node):
        return str(node.size or "")

    def ensure_key(self, name, public_key):
        return public_key.strip(), False  # Linode takes authorized keys at create time: nothing to import

    def delete_key(self, ref):
        pass

    def create_firewall(self, name, cidr, tag):
        # made once the Linode exists (its devices list needs the id): attach_firewall gets this
        return {"pending": name, "cidr": cidr}

    def attach_firewall(self, ref, node):
        import json

        body = {"label": ref["pending"],
                "rules": {"inbound_policy": "DROP", "outbound_policy": "ACCEPT",
                          "inbound": [{"protocol": "TCP", "ports": "22", "action": "ACCEPT", "label": "ssh",
                                       "addresses": {"ipv4": [ref["cidr"]]}}]},
                "devices": {"linodes": [int(node.id)]}}
        res = self.driver().connection.request("/v4/networking/firewalls", data=json.dumps(body), method="POST")
        return res.object["id"]

    def delete_firewall(self, ref):
        if isinstance(ref, dict):  # never made (the Linode did not get that far)
            return
        if ref is not None:
            self.driver().connection.request(f"/v4/networking/firewalls/{ref}", method="DELETE")

    def find_firewall(self, name):
        res = self.driver().connection.request("/v4/networking/firewalls", params={"page_size": 500})
        return next((f["id"] for f in res.object.get("data", []) if f.get("label") == name), None)

    def create_node(self, *, name, size, image, key, firewall, tags, spot, disk_gb, terminate_on_shutdown):
        from libcloud.compute.base import NodeImage, NodeLocation, NodeSize

        d = self.driver()
        return d.create_node(NodeLocation(self.region, self.region, None, d), name, NodeSize(size, size, 0, 0, 0, 0, d),
                             NodeImage(image, image, d), root_pass=secrets.token_urlsafe(24) + "aA1!",
                             ex_authorized_keys=[key], ex_tags=_tags_to_list(tags))

    def fetch_node(self, node_id):
        try:
            return self.driver().ex_get_node(node_id)
        except Exception as e:  # Linode's driver raises its own exception type for a 404
            if "not found" in str(e).lower():
                return None
            raise

class OpenStackAPI(CloudAPI):
    ptype = "openstack"

    def make_driver(self):
        from libcloud.compute.drivers.openstack import OpenStack_2_NodeDriver

        url = self.options.get("endpoint") or self.env.get("OS_AUTH_URL")
        user, password = self.env.get("OS_USERNAME"), self.env.get("OS_PASSWORD")
        project = self.options.get("project") or self.env.get("OS_PROJECT_NAME") or self.env.get("OS_TENANT_NAME")
        if not (url and user and password and project):
            missing = [n for n, v in (("OS_AUTH_URL", url), ("OS_USERNAME", user), ("OS_PASSWORD", password),
                                      ("OS_PROJECT_NAME", project)) if not v]
            raise self.missing_credentials("missing " + ", ".join(missing))
        u = urlparse(url)
        return OpenStack_2_NodeDriver(
            user, password, secure=u.scheme == "https",
            ex_force_auth_url=url.rstrip("/").removesuffix("/v3"), ex_force_auth_version="3.x_password",
            ex_tenant_name=project,
            ex_domain_name=self.options.get("domain") or self.env.get("OS_USER_DOMAIN_NAME") or "Default",
            ex_force_service_region=self.region, ex_force_auth_token=None)

    def tags(self, node):
        return {str(k): str(v) for k, v in (node.extra.get("metadata") or {}).items()}

    def size_of(self, node):  # on the event loop: only what the listing calls below already fetched
        fid = node.extra.get("flavorId")
        return self._flavors.get(str(fid), str(fid or ""))

    _flavors: dict[str, str] = {}  # flavor id -> name: nova lists servers by flavor id

    def _learn_flavors(self) -> list:
        sizes = self.driver().list_sizes()
        self._flavors = {str(s.id): s.name for s in sizes}
        return sizes

    def list_nodes(self) -> list:  # in the API thread, under the lock, like every libcloud call
        nodes = self.driver().list_nodes()
        if not self._flavors:
            self._learn_flavors()
        return nodes

    def started(self, node):
        c = node.extra.get("created")
        return str(c) if c else None

    def sizes(self):
        out = {}
        for s in self._learn_flavors():
            out[s.name] = {"vcpus": s.vcpus if hasattr(s, "vcpus") else s.extra.get("vcpus"), "ram_mib": s.ram,
                           "price": s.price or None}
        return out

    def fetch_node(self, node_id):
        node = self.driver().ex_get_node_details(node_id)
        if not self._flavors:
            self._learn_flavors()
        return node

    def create_firewall(self, name, cidr, tag):
        d = self.driver()
        sg = d.ex_create_security_group(name, "labdeck: SSH only")
        d.ex_create_security_group_rule(sg, "tcp", 22, 22, cidr)
        return sg

    def delete_firewall(self, ref):
        self.driver().ex_delete_security_group(ref)

    def find_firewall(self, name):
        return next((g for g in self.driver().ex_list_security_groups() if g.name == name), None)

    def create_node(self, *, name, size, image, key, firewall, tags, spot, disk_gb, terminate_on_shutdown):
        d = self.driver()
        flavor = next((s for s in d.list_sizes() if s.name == size or str(s.id) == size), None)
        if flavor is None:
            raise ProviderError(f"{self.provider}: there is no flavor {size!r} in {self.region} (not offered).",
                                "`labdeck sizes " + self.provider + "` lists the flavors.")
        img = next((i for i in d.list_images() if i.name == image or str(i.id) == image), None)
        if img is None:
            raise ProviderError(f"{self.provider}: there is no image {image!r}.", "Set `image` to an image name or id.")
        return d.create_node(name=name, size=flavor, image=img, ex_keyname=key, ex_metadata=tags,
                             ex_security_groups=[firewall] if firewall is not None else None)

    def start(self, node):
        self.driver().ex_start_node(node)

    def stop(self, node):
        self.driver().ex_stop_node(node)


APIS: dict[str, type[CloudAPI]] = {"ec2": EC2API, "digitalocean": DigitalOceanAPI, "linode": LinodeAPI,
                                   "openstack": OpenStackAPI}


# ---- the Provider -----------------------------------------------------------------------------

class LaunchFailed(ProviderError):
    pass


class CloudProvider(Provider):
    """Instances of one cloud account and region, through libcloud."""

    def __init__(self, name: str, options: Mapping[str, object], *, ptype: str, pool: SSHPool,
                 catalog: Catalog | None = None, env: Mapping[str, str] | None = None,
                 ssh_config: SSHConfig | None = None) -> None:
        super().__init__(name, options)
        self.type = ptype
        self.api: CloudAPI = APIS[ptype](name, self.options, os.environ if env is None else env)
        self.pool = pool
        self.catalog = catalog or Catalog.load()
        self.ssh_config = ssh_config if ssh_config is not None else SSHConfig.load(self.options.get("ssh_config") or None)
        self.region = str(self.options["region"])
        self._nodes: dict[str, Any] = {}  # instance name -> last libcloud Node
        self._instances: dict[str, Instance] = {}
        self._sizes: dict[str, dict[str, Any]] | None = None
        self._creating: set[str] = set()
        self.terminated_ids: set[str] = set()
        self.shut_down_inside: dict[str, str | None] = {}  # labdeck id -> when (if known): shut down from the VM
        self.calls = 0

    # -- plumbing
    async def call(self, doing: str, fn, *args, **kwargs):
        """One blocking libcloud call in a thread, under api_timeout; errors explained."""
        self.calls += 1
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._locked, fn, *args, **kwargs),
                                          float(self.options["api_timeout"]))
        except LabdeckError:
            raise
        except Exception as e:  # noqa: BLE001 - every libcloud / HTTP error becomes a ProviderError
            raise explain(self.name, self.type, e, doing) from None

    def _locked(self, fn, *args, **kwargs):
        with self.api.lock:
            return fn(*args, **kwargs)

    def key_paths(self) -> tuple[Path, Path]:
        given = self.options.get("ssh_key") or ""
        candidates = [given] if given else ["~/.ssh/id_ed25519", "~/.ssh/id_rsa"]
        for c in candidates:
            p = Path(os.path.expanduser(str(c)))
            if p.exists() and Path(str(p) + ".pub").exists():
                return p, Path(str(p) + ".pub")
        raise ProviderError(f"{self.name}: no SSH key pair at {' or '.join(candidates)} (the private key and its .pub).",
                            "Create one with `ssh-keygen -t ed25519`, or set `ssh_key` in the provider's config.")

    def size_info(self, size: str, api: dict[str, Any] | None = None) -> SizeInfo:
        override = (self.options.get("prices") or {}).get(size)
        if api is None and self._sizes is not None:
            api = self._sizes.get(size)
        return self.catalog.describe(self.type, size, self.region, api=api, override=override)

    async def sizes(self, refresh: bool = False) -> list[SizeInfo]:
        if self._sizes is None or refresh:
            self._sizes = await self.call("listing sizes", self.api.sizes)
        return [self.size_info(s, a) for s, a in sorted(self._sizes.items())]

    async def _try_sizes(self) -> None:
        try:
            await self.sizes()
        except LabdeckError:
            pass  # instances still list, without what only the size listing knows

    def address_of(self, node) -> str:
        ips = node.private_ips if self.options["address"] == "private" else node.public_ips
        ips = [ip for ip in ips or [] if ip and ":" not in ip] or list(ips or [])
        return ips[0] if ips else ""

    def _to_instance(self, node) -> Instance:
        tags = self.api.tags(node)
        size = self.api.size_of(node)
        info = self.size_info(size)
        state = STATE_MAP.get(str(getattr(node.state, "value", node.state)).lower(), "unknown")
        managed = TAG_ID in tags
        inst = Instance(id=tags.get(TAG_ID) or f"{self.name}/{node.id}", name=node.name or str(node.id),
                        provider=self.name, provider_type=self.type, state=state, host=self.address_of(node),
                        vcpus=info.vcpus, memory_mib=info.ram_mib,
                        gpus=[{"index": i, "name": info.gpu or "GPU", "memory_total_mib": 0} for i in range(info.gpus)],
                        gpu_note="" if info.gpus else "no GPU in this size",
                        price_per_hour=info.price_per_hour or 0.0, started_at=self.api.started(node),
                        created_by=tags.get(TAG_OWNER, ""), tags=tags, size=size, region=self.region,
                        spot=self.api.spot(node), labdeck_id=tags.get(TAG_ID, ""), cloud_id=str(node.id),
                        managed=managed, price_source=info.price_source)
        if not managed:
            inst.note = "made outside labdeck: listed, never changed unless forced"
        return inst

    # -- Provider contract
    async def list_instances(self) -> list[Instance]:
        if self._sizes is None and self.type != "ec2":  # prices and shapes come from the size listing (once)
            nodes, _ = await asyncio.gather(self.call("listing instances", self.api.list_nodes), self._try_sizes())
        else:
            nodes = await self.call("listing instances", self.api.list_nodes)
        out = []
        # what the provider lists now replaces what it listed before (a launch under way keeps its entry)
        fresh_nodes = {n: v for n, v in self._nodes.items() if n in self._creating}
        fresh = {n: v for n, v in self._instances.items() if n in self._creating}
        self.terminated_ids = set()  # labdeck ids the provider lists as terminated (gone for sure)
        self.shut_down_inside = {}
        for node in nodes:
            inside, when = self.api.shut_down_inside(node)
            if inside and self.api.tags(node).get(TAG_ID):
                self.shut_down_inside[self.api.tags(node)[TAG_ID]] = when
            if str(getattr(node.state, "value", node.state)).lower() == "terminated":
                self.terminated_ids.add(self.api.tags(node).get(TAG_ID, ""))
                continue
            inst = self._to_instance(node)
            fresh_nodes[inst.name] = node
            fresh[inst.name] = inst
            out.append(inst)
        self._nodes, self._instances = fresh_nodes, fresh
        return out

    async def describe(self, instance: str) -> Instance:
        node = await self._node(instance, refresh=True)
        inst = self._instances[instance] = self._to_instance(node)
        return inst

    async def _node(self, instance: str, refresh: bool = False):
        node = self._nodes.get(instance)
        if node is None or refresh:
            if node is not None:
                fresh = await self.call(f"reading {instance}", self.api.get_node, str(node.id))
                if fresh is None:
                    self._nodes.pop(instance, None)
                    raise ProviderError(f"{self.name}: instance {instance} no longer exists.")
                node = fresh
            else:
                await self.list_instances()
                node = self._nodes.get(instance)
                if node is None:
                    raise ProviderError(f"{self.name}: no instance named {instance!r}.", "`labdeck ls` lists instances.")
            self._nodes[instance] = node
        return node

    def owns(self, instance: str) -> bool:
        inst = self._instances.get(instance)
        return bool(inst and inst.managed)

    def _guard(self, instance: str, what: str, force: bool) -> None:
        if not force and not self.owns(instance):
            raise ProviderError(f"{instance} was not launched by labdeck: it will not {what} it.",
                                f"Use --force to {what} it anyway.")

    async def start(self, instance: str, *, force: bool = False, progress: Progress | None = None) -> Instance:
        """Start it and wait until it runs (with an address) and answers SSH."""
        self._guard(instance, "start", force)
        say = progress or (lambda stage, detail: None)
        node = await self._node(instance)
        await self.call(f"starting {instance}", self.api.start, node)
        node = await self._wait_running(instance, node, say, from_stopped=True)
        inst = self._instances[instance] = self._to_instance(node)
        if inst.host:
            await self._wait_ssh(instance, inst, say)
        return inst

    async def stop(self, instance: str, *, force: bool = False) -> Instance:
        self._guard(instance, "stop", force)
        node = await self._node(instance)
        await self.call(f"stopping {instance}", self.api.stop, node)
        return await self.describe(instance)

    async def destroy(self, instance: str, *, force: bool = False) -> None:
        self._guard(instance, "terminate", force)
        node = await self._node(instance)
        await self.call(f"terminating {instance}", self.api.destroy, node)
        self._nodes.pop(instance, None)
        inst = self._instances.pop(instance, None)
        if inst is not None and inst.labdeck_id:
            left = await self._cleanup_extras(instance, inst.labdeck_id, str(node.id))
            if left:
                raise ProviderError(f"{instance} is terminated, but its {', '.join(left)} could not be deleted.",
                                    "Delete it in the provider's console.")
        if inst is not None and inst.host:
            self.pool.known_hosts.forget(inst.host, 22)

    async def _cleanup_extras(self, instance: str, labdeck_id: str, node_id: str) -> list[str]:
        """Delete the firewall labdeck made for an instance (once the provider lets go of it), found
        by its name, so this works after a restart and for a teammate's instance too."""
        try:
            fw = await self.call("finding the firewall", self.api.find_firewall, firewall_name(instance, labdeck_id))
        except ProviderError as e:
            return [f"firewall {firewall_name(instance, labdeck_id)} ({e})"]
        if fw is not None and not await self._delete_firewall_when_free(fw, node_id):
            return [f"firewall {firewall_name(instance, labdeck_id)}"]
        return []

    async def _delete_firewall_when_free(self, fw: Any, node_id: str) -> bool:
        deadline = time.monotonic() + float(self.options["launch_timeout"])
        while True:
            try:
                await self.call("deleting the firewall", self.api.delete_firewall, fw)
                return True
            except ProviderError as e:
                # EC2 refuses while the terminating instance still holds the group (DependencyViolation)
                if time.monotonic() > deadline or "dependency" not in str(e).lower() and "in use" not in str(e).lower():
                    return False
                await asyncio.sleep(float(self.options["poll_seconds"]))

    def firewall_source(self) -> str:
        if self.options.get("ssh_from"):
            v = str(self.options["ssh_from"])
            return v if "/" in v else v + "/32"
        import ipaddress

        for j in self.options.get("jump") or []:
            spec = resolve_host(j, ssh_config=self.ssh_config)
            try:
                ip = ipaddress.ip_address(spec.hostname)
                return f"{ip}/32"
            except ValueError:
                pass
        conn = os.environ.get("SSH_CONNECTION", "").split()
        if len(conn) == 4:
            try:
                ip = ipaddress.ip_address(conn[2])
                if ip.is_global:
                    return f"{ip}/32"
            except ValueError:
                pass
        return "0.0.0.0/0"

    async def create(self, spec: InstanceSpec, *, progress: Progress | None = None, user: str = "",
                     labdeck_id: str = "", on_created: Callable[[Instance], None] | None = None,
                     bootstrap: Callable[[Transport], Any] | None = None) -> Instance:
        """Launch one instance and make it ready: key, firewall, node, running, SSH, bootstrap.

        A failure at any step deletes everything this launch created (node, firewall, key)
        before the error is raised; what could not be deleted is named in the error."""
        from ..ids import new_id

        say = progress or (lambda stage, detail: None)
        name = spec.name
        if not NAME_RE.match(name):
            raise ProviderError(f"Instance name {name!r}: use 2-40 lowercase letters, digits and '-', starting with a letter.")
        size = spec.size or str(self.options["size"])
        if not size:
            raise ProviderError(f"{self.name}: no size given and no default `size` in the config.")
        if spec.spot and self.type != "ec2":
            raise ProviderError(f"{self.name}: {self.type} has no spot instances in labdeck (EC2 has).",
                                "Launch on-demand, or use an EC2 provider for spot.")
        labdeck_id = labdeck_id or new_id()
        say("checking", f"size {size} in {self.region}")
        sizes = await self.sizes()
        known = {s.id: s for s in sizes}
        if size not in known:
            raise ProviderError(f"{self.name}: size {size!r} is not offered in {self.region}.",
                                f"`labdeck sizes {self.name}` lists the sizes.")
        info = known.get(size) or self.size_info(size)
        if info.regions is not None and self.region not in info.regions:
            raise ProviderError(f"{self.name}: size {size} is not offered in region {self.region} "
                                f"(offered in: {', '.join(info.regions) or 'none'}).", "Pick another size or region.")
        if name in self._instances or name in self._nodes:
            raise ProviderError(f"{self.name} already has an instance named {name}.", "Choose another name.")
        priv, pub = self.key_paths()
        public_key = pub.read_text().strip()
        created: list[tuple[str, Any]] = []
        tags = {TAG_OWNER: user or "unknown", TAG_ID: labdeck_id, TAG_NAME: name}
        image = spec.image or str(self.options["image"])
        action = str((spec.options or {}).get("autostop_action") or self.options["autostop_action"])
        node = None
        self._creating.add(name)
        try:
            say("key", f"importing {pub.name}")
            key_name = f"labdeck-{user or 'user'}-{_fingerprint(public_key)}"
            key_ref, made = await self.call("importing the SSH key", self.api.ensure_key, key_name, public_key)
            if made:
                created.append(("key", key_ref))
            cidr = self.firewall_source()
            say("firewall", f"SSH only, from {cidr}")
            fw = await self.call("creating the firewall", self.api.create_firewall, firewall_name(name, labdeck_id),
                                 cidr, firewall_tag(labdeck_id))
            if fw is not None and not isinstance(fw, dict):
                created.append(("firewall", fw))
            say("creating", f"{size} ({info.gpu_summary}, {_price(info)}){' spot' if spec.spot else ''}, image {image}")
            # a spot instance can only be terminated by shutdown; autostop=terminate asks for the same
            node = await self.call("creating the instance", self.api.create_node, name=name, size=size, image=image,
                                   key=key_ref, firewall=fw, tags=tags, spot=spec.spot,
                                   disk_gb=int(self.options["disk_gb"]),
                                   terminate_on_shutdown=spec.spot or action == "terminate")
            created.append(("node", node))
            self._nodes[name] = node
            inst = self._to_instance(node)
            inst.managed, inst.labdeck_id, inst.created_by = True, labdeck_id, user
            self._instances[name] = inst
            if on_created is not None:
                on_created(inst)
            node = await self._wait_running(name, node, say)
            if isinstance(fw, dict):  # Linode: the firewall is made now, for this Linode
                fw = await self.call("creating the firewall", self.api.attach_firewall, fw, node)
                created.append(("firewall", fw))
            inst = self._instances[name] = self._to_instance(node)
            if not inst.host:
                raise ProviderError(f"{self.name}: {name} is running but has no {self.options['address']} address.",
                                    "Set `address` (public or private) to one the instance has.")
            self.pool.known_hosts.forget(inst.host, 22)  # a new machine: an old key for this address is not its key
            await self._wait_ssh(name, inst, say)
            if bootstrap is not None:
                await bootstrap(self.transport(name))
            return inst
        except BaseException as e:
            left = await self._undo(created, say)
            left += await self._sweep(name, labdeck_id, created, say)
            self._nodes.pop(name, None)
            self._instances.pop(name, None)
            if isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)):
                raise
            base = e if isinstance(e, LabdeckError) else explain(self.name, self.type, e, "launching")
            msg = base.message if hasattr(base, "message") else str(base)
            cleaned = [k for k, _ in created if k not in {x.split()[0] for x in left}]
            tail = (f" Cleaned up: {', '.join(cleaned)}." if cleaned else "") + (
                f" Could NOT delete: {', '.join(left)} — remove them in the provider's console." if left else "")
            raise LaunchFailed(f"Launch of {name} failed: {msg}{tail}", getattr(base, "hint", "")) from None
        finally:
            self._creating.discard(name)

    async def _sweep(self, name: str, labdeck_id: str, created: list[tuple[str, Any]], say: Progress) -> list[str]:
        """What a call that timed out may still have made (the provider finished it after labdeck gave
        up): instances tagged with this launch's id, and its firewall by name."""
        left: list[str] = []
        try:
            nodes = await self.call("looking for what the launch left", self.api.list_nodes)
        except LabdeckError:
            return [f"possibly an instance tagged labdeck-id={labdeck_id} (the provider did not answer)"]
        done = {str(getattr(r, "id", "")) for k, r in created if k == "node"}
        for n in nodes:
            if self.api.tags(n).get(TAG_ID) == labdeck_id and str(n.id) not in done \
                    and str(getattr(n.state, "value", n.state)).lower() != "terminated":
                say("cleanup", f"deleting instance {n.id}, made after labdeck stopped waiting")
                try:
                    await self.call("terminating the half-made instance", self.api.destroy, n)
                except LabdeckError:
                    left.append(f"node {n.id}")
        if not any(k == "firewall" for k, _ in created):
            try:
                fw = await self.call("finding the firewall", self.api.find_firewall, firewall_name(name, labdeck_id))
                if fw is not None and not await self._delete_firewall_when_free(fw, ""):
                    left.append(f"firewall {firewall_name(name, labdeck_id)}")
            except LabdeckError:
                pass
        return left

    async def _undo(self, created: list[tuple[str, Any]], say: Progress) -> list[str]:
        left: list[str] = []
        node_id = ""
        for kind, ref in reversed(created):
            say("cleanup", f"deleting the {kind}")
            try:
                if kind == "node":
                    node_id = str(ref.id)
                    await self.call("terminating the half-made instance", self.api.destroy, ref)
                elif kind == "firewall":
                    if not await self._delete_firewall_when_free(ref, node_id):
                        left.append(f"firewall {getattr(ref, 'id', ref)}")
                elif kind == "key":
                    await self.call("deleting the imported key", self.api.delete_key, ref)
            except LabdeckError:
                left.append(f"{kind} {getattr(ref, 'id', ref)}")
        return left

    async def _wait_running(self, name: str, node, say: Progress, *, from_stopped: bool = False):
        deadline = time.monotonic() + float(self.options["launch_timeout"])
        t0 = time.monotonic()
        while True:
            fresh = await self.call(f"reading {name}", self.api.get_node, str(node.id))
            if fresh is None:
                raise ProviderError(f"{self.name}: {name} disappeared while starting (the provider removed it).")
            node = fresh
            self._nodes[name] = node
            state = STATE_MAP.get(str(getattr(node.state, "value", node.state)).lower(), "unknown")
            if state == "running" and self.address_of(node):
                return node
            if state == "stopped" and from_stopped and time.monotonic() - t0 < 60:
                state = "pending"  # a start takes a moment to show
            elif state in ("terminated", "error", "stopped"):
                fault = node.extra.get("fault") or {}
                why = fault.get("message") if isinstance(fault, dict) else str(fault)
                err = ProviderError(f"{self.name}: {name} went to {state} while starting" + (f": {why}" if why else "") + ".")
                raise explain(self.name, self.type, err if not why else Exception(why), "starting the instance")
            if time.monotonic() > deadline:
                raise ProviderError(f"{self.name}: {name} was not running after {self.options['launch_timeout']:g}s.",
                                    "`launch_timeout` in the config sets how long labdeck waits.")
            say("provisioning", f"{state} ({time.monotonic() - t0:.0f}s)")
            await asyncio.sleep(float(self.options["poll_seconds"]))

    async def _wait_ssh(self, name: str, inst: Instance, say: Progress) -> None:
        transport = self.transport(name)
        deadline = time.monotonic() + float(self.options["ssh_timeout"])
        t0 = time.monotonic()
        last = ""
        while True:
            say("ssh", f"waiting for SSH on {inst.host} ({time.monotonic() - t0:.0f}s){': ' + last if last else ''}")
            try:
                res = await transport.run("true", timeout=float(self.options["connect_timeout"]) * 2)
                if res.ok:
                    return
            except LabdeckError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise ProviderError(f"{self.name}: no SSH on {name} ({inst.host}) after {self.options['ssh_timeout']:g}s: {last}",
                                    "Check `ssh_user`, `address`, `jump` and that the image runs sshd.")
            await asyncio.sleep(min(2.0, float(self.options["poll_seconds"])))

    def spec_for(self, instance: str, host: str) -> HostSpec:
        priv, _ = self.key_paths()
        jump = tuple(self.options.get("jump") or ())
        return resolve_host(instance, ssh_config=self.ssh_config, user=str(self.options["ssh_user"]) or None, hostname=host,
                            port=22, identity_files=(str(priv),), jump=jump)

    def transport(self, instance: str) -> Transport:
        inst = self._instances.get(instance)
        if inst is None:
            raise ProviderError(f"{self.name}: no instance named {instance!r} (yet).", "`labdeck ls` lists instances.")
        if inst.state != "running" or not inst.host:
            raise ProviderError(f"{instance} is {inst.state}: there is nothing to connect to.",
                                f"`labdeck start {instance}` starts it.")
        return SSHTransport(self.pool, self.spec_for(instance, inst.host), instance=instance,
                            runs_dir=str(self.options["runs_dir"]))

    def max_concurrent(self, instance: str) -> int:
        return int(self.options["max_concurrent"])

    async def close(self) -> None:
        await self.pool.close()


def _fingerprint(public_key: str) -> str:
    import base64
    import hashlib

    parts = public_key.split()
    try:
        raw = base64.b64decode(parts[1])
    except (IndexError, ValueError):
        raw = public_key.encode()
    return hashlib.sha256(raw).hexdigest()[:8]


def _price(info: SizeInfo) -> str:
    return f"${info.price_per_hour:.3f}/h" if info.price_per_hour is not None else "price unknown"
