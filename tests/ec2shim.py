"""A real moto EC2 server on loopback, behind a small shim that libcloud's real EC2 driver needs.

The shim is a reverse proxy between libcloud and ``moto.server.ThreadedMotoServer``; it mends
only differences between moto and real EC2, and stands in for what cannot exist here:

* **XML namespace.** moto answers ``xmlns="http://ec2.amazonaws.com/doc/2016-11-15"``; real EC2
  (and libcloud's parser) use the same URL with a trailing ``/``. Without it libcloud finds nothing.
* **Addresses.** A moto instance's IP leads nowhere. The shim rewrites each instance's
  ``ipAddress``/``privateIpAddress`` to an address from ``ip_pool`` (the SSH test rig's nodes), per
  instance id, so labdeck's wait-for-SSH and bootstrap run against a real sshd.
* **Faults**, for the error-path tests: ``fail_next(action, code, message)`` answers the next call of
  an EC2 action with EC2's real error shape (``<Response><Errors><Error><Code>…``); ``delay``
  holds every answer (API timeout).

Everything else — instances, states, tags, security groups, key pairs, images — is moto's.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from moto.server import ThreadedMotoServer

NS_BAD = b'xmlns="http://ec2.amazonaws.com/doc/2016-11-15"'
NS_GOOD = b'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"'


class EC2Shim:
    def __init__(self, ip_pool: tuple[str, ...] = ("198.18.0.10",)) -> None:
        self.ip_pool = list(ip_pool)
        self.addresses: dict[str, str] = {}  # instance id -> address handed out
        self.delay = 0.0
        self.actions: list[str] = []
        self._faults: dict[str, tuple[int, str, str]] = {}
        self._lock = threading.Lock()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "EC2Shim":
        self.moto.start()
        self.moto_host, self.moto_port = self.moto.get_host_and_port()
        # moto keeps its backends per process, across servers: start from an empty account
        c = http.client.HTTPConnection(self.moto_host, self.moto_port, timeout=10)
        c.request("POST", "/moto-api/reset")
        c.getresponse().read()
        c.close()
        shim = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                self._relay(None)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                self._relay(self.rfile.read(n) if n else b"")

            def _relay(self, body):
                q = parse_qs(urlparse(self.path).query)
                if body:
                    q.update(parse_qs(body.decode("utf-8", "replace")))
                action = (q.get("Action") or [""])[0]
                shim.actions.append(action)
                if shim.delay:
                    time.sleep(shim.delay)
                fault = shim._faults.pop(action, None)
                if fault is not None:
                    status, code, message = fault
                    data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
                            f"<Message>{message}</Message></Error></Errors><RequestID>shim</RequestID></Response>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "text/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(shim.moto_host, shim.moto_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                data = shim._mend(data)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def fail_next(self, action: str, code: str, message: str, status: int = 400) -> None:
        self._faults[action] = (status, code, message)

    def _address(self, instance_id: str) -> str:
        with self._lock:
            if instance_id not in self.addresses:
                self.addresses[instance_id] = self.ip_pool[len(self.addresses) % len(self.ip_pool)]
            return self.addresses[instance_id]

    _ITEM = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")

    def _mend(self, data: bytes) -> bytes:
        data = data.replace(NS_BAD, NS_GOOD)
        if b"<instancesSet>" not in data:
            return data
        # each instance's addresses -> the address its id was given (the rig node standing in for the VM)
        matches = list(self._ITEM.finditer(data))
        if not matches:
            return data
        out = [data[:matches[0].start()]]
        for i, m in enumerate(matches):  # from one instance's id to the next one's: that instance's XML
            end = matches[i + 1].start() if i + 1 < len(matches) else len(data)
            addr = self._address(m.group(1).decode()).encode()
            body = re.sub(rb"<ipAddress>[^<]*</ipAddress>", b"<ipAddress>" + addr + b"</ipAddress>", data[m.start():end])
            body = re.sub(rb"<privateIpAddress>[^<]*</privateIpAddress>",
                          b"<privateIpAddress>" + addr + b"</privateIpAddress>", body)
            out.append(body)
        return b"".join(out)

    def shutdown_from_inside(self, instance_id: str) -> None:
        """What ``shutdown -h now`` on the VM does (the instance's OS is the one thing moto has not got):
        stopped, with EC2's reason Client.InstanceInitiatedShutdown (an API stop says UserInitiated)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends
        from moto.ec2.models.instances import StateReason

        self.boto3().stop_instances(InstanceIds=[instance_id])
        inst = ec2_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].get_instance(instance_id)
        inst.state_reason = StateReason("Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                                        "Client.InstanceInitiatedShutdown")

    def boto3(self):
        import boto3

        return boto3.client("ec2", region_name="us-east-1", endpoint_url=f"http://{self.moto_host}:{self.moto_port}",
                            aws_access_key_id="AKIDLABDECKTEST", aws_secret_access_key="secret")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        try:
            self.moto.stop()
        except Exception:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
