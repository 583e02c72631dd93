"""Two "hosts" on one machine: two network namespaces joined by a veth pair (needs root + iproute2).

    with TwoHosts() as hosts:
        hosts.addr[0], hosts.addr[1]          # 10.A.B.1, 10.A.B.2
        hosts.ifname[0]                       # the veth inside namespace 0 (for GLOO_SOCKET_IFNAME)
        subprocess.Popen(hosts.wrap(0, ["torchrun", ...]))   # ip netns exec <ns0> torchrun ...

Names carry this process id (mdt<pid>a/b, veth mdv<pid>a/b) and a random /24 in 10.0.0.0/8
so concurrent test runs do not collide. `__exit__` deletes both namespaces (which destroys the
veth pair); a failure half-way through `__enter__` undoes what was made; leftovers of a killed
run (a pid that no longer exists) are removed by the next `TwoHosts()`. Only traffic between the
two namespaces is ever sent: nothing is routed to the host or outside.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess

PREFIX_NS, PREFIX_VETH = "mdt", "mdv"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def missing_requirements() -> str | None:
    """One line saying why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "`ip` not found: install iproute2 (bash .ci/system-deps does, as root)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (the owner of a leftover namespace, link or daemon)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list:
    """Delete namespaces and veths left by a test process that no longer exists; returns their names."""
    gone = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(PREFIX_NS + r"(\d+)[ab]", name)
        if m and not pid_alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.search(r"\d+: (" + PREFIX_VETH + r"(\d+)[ab])[@:]", line)
        if m and not pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
            gone.append(m.group(1))
    return gone


class TwoHosts:
    def __init__(self):
        pid = os.getpid()
        self.ns = [f"{PREFIX_NS}{pid}a", f"{PREFIX_NS}{pid}b"]
        self.ifname = [f"{PREFIX_VETH}{pid}a", f"{PREFIX_VETH}{pid}b"]
        net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.addr = [f"{net}.1", f"{net}.2"]

    def __enter__(self) -> "TwoHosts":
        remove_stale()
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
            _ip("link", "add", self.ifname[0], "type", "veth", "peer", "name", self.ifname[1])
            for i in (0, 1):
                _ip("link", "set", self.ifname[i], "netns", self.ns[i])
                _ip("-n", self.ns[i], "addr", "add", f"{self.addr[i]}/24", "dev", self.ifname[i])
                _ip("-n", self.ns[i], "link", "set", "lo", "up")
                _ip("-n", self.ns[i], "link", "set", self.ifname[i], "up")
        except BaseException:
            self.close()
            raise
        return self

    def wrap(self, i: int, cmd: list) -> list:
        """`cmd` run inside host i's namespace."""
        return ["ip", "netns", "exec", self.ns[i], *cmd]

    def close(self) -> None:
        for ns in self.ns:
            _ip("netns", "del", ns, check=False)
        for dev in self.ifname:  # only left on the host if __enter__ failed before moving it
            _ip("link", "del", dev, check=False)

    def leftovers(self) -> list:
        """Names of this object's namespaces/links that still exist (for tests of the clean-up)."""
        names = " ".join(l.split()[0] for l in _ip("netns", "list", check=False).stdout.splitlines() if l.split())
        links = _ip("-o", "link", "show", check=False).stdout
        return [n for n in self.ns if n in names.split()] + [d for d in self.ifname if re.search(rf": {d}[@:]", links)]

    def __exit__(self, *exc) -> None:
        self.close()
