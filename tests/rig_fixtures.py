"""Pytest fixtures for the SSH test rig (see ``tests/rig.py``).

Registered from ``tests/conftest.py`` with ``pytest_plugins = ["tests.rig_fixtures"]``.

* ``ssh_client_key`` (session): an ed25519 keypair; path of the private key (``.pub`` beside it).
* ``rig`` (session): a :class:`tests.rig.Rig` -- jump host + 2 nodes with real sshd in
  network namespaces. Skips when it cannot be built (not root, no sshd, no ``ip netns``);
  with ``LABDECK_REQUIRE_RIG=1`` that is a failure instead.
* ``fresh_rig`` (function): the session rig, :meth:`~tests.rig.Rig.reset` after the test
  (link up, sshd running, node users' processes killed, homes emptied, known_hosts reset).
* ``ssh_server`` (function): a started :class:`tests.rig.LocalSSHServer` on 127.0.0.1.
* ``shared_home_rig`` (module): a :class:`tests.rig.SharedHomeRig` -- two nodes, one Unix user and one
  home directory (a lab's NFS home); skips like ``rig``.
"""

from __future__ import annotations

import os

import pytest

from tests import rig as rigmod


@pytest.fixture(scope="session")
def ssh_client_key(tmp_path_factory: pytest.TempPathFactory):
    return rigmod.write_client_key(tmp_path_factory.mktemp("ssh-client") / "id_ed25519")


def _built(cls, client_key):
    """A rig of ``cls`` (two nodes) for a fixture: skipped where it cannot be built, failed instead
    with LABDECK_REQUIRE_RIG=1 (CI), closed after its last test whatever happened."""
    try:
        r = cls.build(2, client_key=client_key)
    except rigmod.RigUnavailable as e:
        reason = f"SSH rig unavailable: {e}"
        if os.environ.get("LABDECK_REQUIRE_RIG") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    except Exception as e:  # noqa: BLE001 - a broken build is an error, not a skip
        pytest.fail(f"SSH rig build failed: {e}", pytrace=False)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="session")
def rig(ssh_client_key):
    yield from _built(rigmod.Rig, ssh_client_key)


@pytest.fixture(scope="module")
def shared_home_rig(ssh_client_key):
    yield from _built(rigmod.SharedHomeRig, ssh_client_key)


@pytest.fixture
def fresh_rig(rig):
    yield rig
    rig.reset()


@pytest.fixture
def ssh_server(tmp_path, ssh_client_key):
    srv = rigmod.LocalSSHServer(tmp_path / "ssh-server-home", ssh_client_key).start()
    try:
        yield srv
    finally:
        srv.close()
