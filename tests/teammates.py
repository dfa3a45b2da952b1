"""Real Unix teammates on one machine (the jump host): users, a shared team directory, and
``labdeck`` run as each of them in real processes.

Used by tests/test_daemon.py and tests/benchmarks/bench_teammate_state.py. Needs root and useradd
(:class:`Unavailable` otherwise). The users run a Python they can reach: ``sys.executable`` when
other users can run it, else ``/usr/bin/python3`` of the same version with a copy of the few
packages the CLI needs in a world-readable directory under /tmp (this interpreter often lives
under a 0700 /root/.pyenv; nothing of the caller's is loosened).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI_PACKAGES = ("click", "rich", "markdown_it", "mdurl", "pygments", "platformdirs", "tinydb", "asyncssh",
                "cryptography", "cffi", "pycparser", "typing_extensions.py", "psutil",
                f"_cffi_backend{sysconfig.get_config_var('EXT_SUFFIX')}")


class Unavailable(RuntimeError):
    """Real users cannot be made here (not root, no useradd, no Python they can run)."""


def _others_can_run(path: str) -> bool:
    p = Path(path).resolve()
    for part in [p, *p.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return True


def shared_python() -> tuple[str, list[str]]:
    """(interpreter, extra sys.path entries) that any user can run labdeck's CLI with."""
    if _others_can_run(sys.executable) and _others_can_run(sysconfig.get_paths()["purelib"]):
        return sys.executable, []
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = f"/usr/bin/{ver}"
    if not (os.path.exists(system) and _others_can_run(system)):
        raise Unavailable(f"no {ver} that other users can run ({sys.executable} is not reachable)")
    site = Path(sysconfig.get_paths()["purelib"])
    target = Path(f"/tmp/ldtest-site-{ver}-{os.geteuid()}")
    stamp = target / ".complete"
    if not stamp.exists():
        tmp = Path(tempfile.mkdtemp(prefix="ldtest-site-", dir="/tmp"))
        for name in CLI_PACKAGES:
            src = site / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "tests"))
            elif src.exists():
                shutil.copy2(src, tmp / name)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                raise Unavailable(f"{src} is missing: cannot give other users labdeck's packages")
        subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True)
        (tmp / ".complete").write_text("")
        try:
            tmp.rename(target)
        except OSError:  # another test process made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        os.chmod(target, 0o755)
    return system, [str(target)]


@contextmanager
def real_users(*roles: str):
    """Real unprivileged users, one per role (role -> pwd entry); removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        raise Unavailable("needs root and useradd to create real users")
    tag = os.getpid() % 10000
    names = {role: f"ldd{tag}{chr(97 + k)}" for k, role in enumerate(roles)}
    made = []
    try:
        for name in names.values():
            subprocess.run(["userdel", "-f", name], capture_output=True)
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
            made.append(name)
        yield {role: pwd.getpwnam(name) for role, name in names.items()}
    finally:
        for name in made:
            kill_user_processes(pwd.getpwnam(name).pw_uid)
            remove_user(name)


def remove_user(name: str) -> None:
    """userdel, and the user's own group where useradd made one."""
    subprocess.run(["userdel", "-f", name], capture_output=True)
    try:
        grp.getgrnam(name)
        subprocess.run(["groupdel", name], capture_output=True)
    except KeyError:
        pass


def kill_user_processes(uid: int) -> None:
    """SIGKILL every process of ``uid`` (a test's users own nothing else: their jobs, their followers)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), 9)
        except (OSError, ProcessLookupError):
            continue


@dataclass
class Teammate:
    """One user with their own LABDECK_HOME (0700, theirs) and the shared team directory."""

    pw: pwd.struct_passwd
    home: Path
    team: Path
    python: str
    pythonpath: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pw.pw_name

    def env(self, **more: str) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
               "LABDECK_HOME": str(self.home), "LABDECK_TEAM_DIR": str(self.team), "LANG": "C.UTF-8",
               "PYTHONPATH": os.pathsep.join([str(REPO), *self.pythonpath]), "PYTHONWARNINGS": "ignore",
               "COLUMNS": "200", **self.extra_env}
        env.update(more)
        return {k: v for k, v in env.items() if v is not None}

    def popen(self, argv: list[str], *, new_session: bool = False, **env: str) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=str(self.home), env=self.env(**env), user=self.pw.pw_uid, group=self.pw.pw_gid,
                                extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=new_session)

    def labdeck(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        p = self.popen([self.python, "-m", "tui.cli", *args], **env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"labdeck {' '.join(args)} as {self.name} hung for {timeout} s: {err.decode()[-2000:]}")
        return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def make_team(base: Path, users: dict[str, pwd.struct_passwd]) -> dict[str, Teammate]:
    """A sticky 1777 team directory under ``base`` (which every user can traverse) and a private
    LABDECK_HOME for each user."""
    python, pythonpath = shared_python()
    team = base / "team"
    team.mkdir()
    os.chmod(team, 0o1777)
    out = {}
    for role, pw in users.items():
        home = base / f"home-{role}"
        home.mkdir(mode=0o700)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        out[role] = Teammate(pw, home, team, python, pythonpath)
    return out


def wait_for(pred, timeout: float, poll: float = 0.05, what: str = "condition"):
    """``pred()``'s first true value within ``timeout`` s, or an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
