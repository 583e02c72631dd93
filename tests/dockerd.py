"""A private Docker daemon for the tests, a base image without a registry, and a wheelhouse.

    with Dockerd() as d:                               # its own socket; data root cached (see below)
        base = d.base_image()                          # debootstrap bookworm + docker import (cached tarball)
        with Wheelhouse.serve() as links:              # torch 2.13.0 CPU + every dependency, over http
            d.docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                     "--build-arg", f"PIP_FIND_LINKS={links}", "-f", "docker/Dockerfile", "-t", "x", ".")
        d.docker("run", "--rm", "--network", "none", "x", "moedist", "doctor")

The daemon listens on `/tmp/mdd<pid>_*/docker.sock` (short: unix socket paths are limited to
108 bytes) and never on the host's default socket. It runs with `--iptables=false
--ip-forward=false --ip-masq=false --bridge=none`: no docker0 and no iptables rules; a
user-defined bridge network (`docker network create`) still works, its containers talking
over the bridge. Whatever it changes anyway is undone by `close()` (also after a failure):
containers it ran are removed, networks deleted, dockerd and its containerd stopped, then new
docker0/br-*/veth links deleted, new DOCKER* iptables chains flushed and deleted (and jumps to
them), and net.ipv4.ip_forward put back. `host_changes()` lists what is still different from
the snapshot taken at start (the tests assert it is empty).

Caching under `~/.cache/moedist/docker` (MOEDIST_DOCKER_CACHE overrides): `root/` is the
data root (images and build layers survive between runs; a lock file keeps two daemons off it,
the second one then gets a private temporary data root), `base-bookworm.tar` the debootstrapped
root file system, `wheels-<hash>/` the wheelhouse for the image's pip installs.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

from tests.netns import pid_alive

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MOEDIST_DOCKER_CACHE", Path.home() / ".cache" / "moedist" / "docker"))
BASE_TAG = "moedist-base:bookworm"
SUITE = "bookworm"                    # Python 3.11, as the cp311 torch wheel needs
PREFIX = "/tmp/mdd"
# binaries the Docker tests need and the Debian packages that have them (.ci/system-deps installs these)
TOOLS = {"dockerd": "docker.io", "debootstrap": "debootstrap", "iptables": "iptables", "ip": "iproute2"}
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def _which(tool: str) -> Optional[str]:
    return shutil.which(tool) or shutil.which(tool, path=SBIN)


def missing_requirements() -> Optional[str]:
    """One line saying why the Docker tests cannot run here, or None."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if _which(tool) is None})
    if missing:
        return f"missing {', '.join(missing)}: bash .ci/system-deps installs them (as root with apt-get)"
    if os.geteuid() != 0:
        return "the Docker tests start their own dockerd: they need root"
    return None


def ensure_requirements() -> Optional[str]:
    """Install what is missing through .ci/system-deps (as root with apt); returns why not, or None."""
    if missing_requirements() is None:
        return None
    res = subprocess.run(["bash", str(ROOT / ".ci" / "system-deps")], capture_output=True, text=True)
    return missing_requirements() or (None if res.returncode == 0 else res.stderr.strip())


def docker_client() -> str:
    """The CLI of the daemon's own package (docker.io's /usr/bin/docker) before any other on PATH."""
    dockerd = _which("dockerd")
    beside = Path(dockerd).resolve().parent.parent / "bin" / "docker" if dockerd else None
    if beside is not None and beside.exists():
        return str(beside)
    found = shutil.which("docker")
    if found is None:
        raise RuntimeError("no docker client: install docker.io")
    return found


def _run(cmd: List[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop_pid(pid: Optional[int], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds (a process we started: its id is in our pid file)."""
    if pid is None or not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ host state

def _links() -> set:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    return {m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)", out, re.M)}


def _docker_chains() -> dict:
    """{table: set of chain names starting with DOCKER}."""
    out = {}
    for table in ("filter", "nat"):
        text = _run([_which("iptables") or "iptables", "-t", table, "-S"], check=False).stdout
        out[table] = {m.group(1) for m in re.finditer(r"^-N (DOCKER\S*)", text, re.M)}
    return out


def _ip_forward() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


class HostSnapshot:
    """What dockerd may change on the host: links, DOCKER iptables chains, ip_forward."""

    DOCKER_LINK = re.compile(r"^(docker0|br-[0-9a-f]{12}|veth[0-9a-f]{7})$")

    def __init__(self):
        self.links, self.chains, self.ip_forward = _links(), _docker_chains(), _ip_forward()

    def changes(self) -> List[str]:
        out = [f"link {l}" for l in sorted(_links() - self.links) if self.DOCKER_LINK.match(l)]
        for table, chains in _docker_chains().items():
            out += [f"iptables -t {table} chain {c}" for c in sorted(chains - self.chains.get(table, set()))]
        if _ip_forward() != self.ip_forward:
            out.append(f"net.ipv4.ip_forward={_ip_forward()} (was {self.ip_forward})")
        return out

    def restore(self) -> None:
        for link in sorted(_links() - self.links):
            if self.DOCKER_LINK.match(link):
                _run(["ip", "link", "del", link], check=False)
        iptables = _which("iptables") or "iptables"
        for table, chains in _docker_chains().items():
            new = chains - self.chains.get(table, set())
            if not new:
                continue
            # jumps into the new chains first (-D with the -A line's arguments), then the chains
            for line in _run([iptables, "-t", table, "-S"], check=False).stdout.splitlines():
                m = re.match(r"^-A (\S+) (.*)$", line)
                if m and any(f"-j {c}" in line.split("#")[0] + " " for c in new) and m.group(1) not in new:
                    _run([iptables, "-t", table, "-D", m.group(1), *m.group(2).split()], check=False)
            for c in new:
                _run([iptables, "-t", table, "-F", c], check=False)
            for c in new:
                _run([iptables, "-t", table, "-X", c], check=False)
        if _ip_forward() != self.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward + "\n")


# ------------------------------------------------------------------ the daemon

def _mounts_under(d: Path) -> List[str]:
    prefix = str(d).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p.startswith(prefix)]


def _umount_under(d: Path) -> None:
    """dockerd leaves e.g. an nsfs mount at <exec-root>/netns/default; deepest first."""
    for point in sorted(_mounts_under(d), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def remove_stale() -> List[str]:
    """Stop daemons of test processes that no longer exist (pid in the directory name) and delete their dirs."""
    gone = []
    for d in Path(PREFIX).parent.glob(Path(PREFIX).name + "*_*"):
        m = re.fullmatch(Path(PREFIX).name + r"(\d+)_\w+", d.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        _stop_pid(_read_pid(d / "dockerd.pid"))
        _stop_pid(_read_pid(d / "exec" / "containerd" / "containerd.pid"))
        _umount_under(d)
        shutil.rmtree(d, ignore_errors=True)
        gone.append(str(d))
    return gone


class Dockerd:
    def __init__(self, data_root: Optional[Path] = None):
        self.client = docker_client()
        self.want_root = data_root
        self.proc: Optional[subprocess.Popen] = None
        self.containers: List[str] = []
        self.networks: List[str] = []
        self._lock = None
        self.snapshot: Optional[HostSnapshot] = None

    def __enter__(self) -> "Dockerd":
        remove_stale()
        self.snapshot = HostSnapshot()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{Path(PREFIX).name}{os.getpid()}_", dir=Path(PREFIX).parent))
        self.sock = self.dir / "docker.sock"
        try:
            self.data_root = self._data_root()
            self.log = open(self.dir / "dockerd.log", "w")
            cmd = [_which("dockerd"), "-H", f"unix://{self.sock}", "--data-root", str(self.data_root),
                   "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "dockerd.pid"),
                   "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
                   "--userland-proxy=false", "--storage-driver", "overlay2"]
            env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":" + SBIN)
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
            deadline = time.monotonic() + 60
            while self.docker("version", check=False, timeout=10).returncode != 0:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not start; {self.dir / 'dockerd.log'}:\n{self.log_tail()}")
                time.sleep(0.3)
        except BaseException:
            self.close()
            raise
        return self

    def _data_root(self) -> Path:
        """The shared cache data root when no other daemon holds it, else a private one in self.dir."""
        if self.want_root is not None:
            return self.want_root
        CACHE.mkdir(parents=True, exist_ok=True)
        self._lock = open(CACHE / "root.lock", "w")
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return CACHE / "root"
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    return self.dir / "root"
                time.sleep(1)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.dir / "dockerd.log").read_text()[-n:]
        except OSError:
            return ""

    def docker(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="0", DOCKER_CLI_HINTS="false")
        env.pop("DOCKER_CONTEXT", None)
        return _run([self.client, *args], timeout=timeout, check=check, env=env, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="0")
        return subprocess.Popen([self.client, *args], env=env, **kw)

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    # ---- base image: debootstrap + docker import, the tarball cached

    def base_image(self) -> str:
        if self.has_image(BASE_TAG):
            return BASE_TAG
        tarball = CACHE / f"base-{SUITE}.tar"
        if not tarball.exists():
            build_base_tarball(tarball)
        self.docker("import", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE_TAG, timeout=600)
        return BASE_TAG

    # ---- clean-up

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for c in self.containers:
                self.docker("rm", "-f", c, check=False, timeout=60)
            for n in self.networks:
                self.docker("network", "rm", n, check=False, timeout=60)
        containerd_pid = _read_pid(self.dir / "exec" / "containerd" / "containerd.pid") if hasattr(self, "dir") else None
        if self.proc is not None:
            _stop_pid(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        _stop_pid(containerd_pid, timeout=10)
        if hasattr(self, "log"):
            self.log.close()
        if hasattr(self, "dir"):
            _umount_under(self.dir)
        if self.snapshot is not None:
            self.snapshot.restore()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def host_changes(self) -> List[str]:
        """What is still different on the host (links, DOCKER chains, ip_forward, our mounts and dir)."""
        out = self.snapshot.changes() if self.snapshot is not None else []
        if hasattr(self, "dir"):
            out += [f"mount {m}" for m in _mounts_under(self.dir)]
            out += [f"directory {self.dir}"] if self.dir.exists() else []
        return out

    def __exit__(self, *exc) -> None:
        self.close()


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses (sources.list or deb822 .sources), else deb.debian.org."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if uri.endswith("/debian") and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def build_base_tarball(tarball: Path) -> None:
    """Debian `SUITE` (minbase + python3, venv, CA certificates) as a root file system tarball."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debootstrap.", dir=CACHE) as tmp:
        rootfs = Path(tmp) / "root"
        _run([_which("debootstrap"), "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
              SUITE, str(rootfs), apt_mirror()], timeout=900)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        part = tarball.with_suffix(".tar.part")
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(part), "."], timeout=600)
        part.rename(tarball)


# ------------------------------------------------------------------ wheelhouse

class Wheelhouse:
    """torch 2.13.0 (this host's CPU wheel) and every dependency of `.[mpi]` as wheels, built once."""

    @staticmethod
    def path() -> Path:
        key = hashlib.sha256((ROOT / "setup.py").read_bytes() + sys.version.encode()).hexdigest()[:12]
        return CACHE / f"wheels-{key}"

    @classmethod
    def ensure(cls) -> Path:
        out = cls.path()
        if (out / ".complete").exists():
            return out
        out.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(out), "torch==2.13.0", f"{ROOT}[mpi]"],
             timeout=1200, cwd=ROOT)
        for own in out.glob("moedist-*.whl"):
            own.unlink()
        (out / ".complete").write_text("")
        return out

    @classmethod
    @contextlib.contextmanager
    def serve(cls, port: int = 38719) -> Iterator[str]:
        """An http find-links URL for the wheelhouse on 127.0.0.1 (reachable from `docker build
        --network host`). A fixed port keeps the URL, and with it the build's layer cache, stable."""
        root = cls.ensure()
        handler = lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw)  # noqa: E731
        for p in (port, 0):
            try:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", p), handler)
                break
            except OSError:
                continue
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
