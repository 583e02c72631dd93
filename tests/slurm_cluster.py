"""A real one-node SLURM cluster on localhost for tests (munge + slurmctld + slurmd).

    with LocalSlurm(tmp_path) as slurm:
        out = slurm.sbatch_wait(["--ntasks=2", "slurm/train.sbatch", ...], env)

Recipe verified in ../shared/notes/launchers.md. Daemons are stopped by their
pid files on exit. Requires the Debian packages slurm-wlm and munge (.ci/run
installs them) and root.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "munged", "mungekey", "sinfo", "scontrol")


def missing_binaries() -> list:
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=paths) is None]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = None):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.cpus = cpus or os.cpu_count() or 2
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"),
                        PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        self._pidfiles = []

    def _run(self, *cmd, check=True, **kw):
        return subprocess.run(list(cmd), env=self.env, check=check, capture_output=True, text=True, **kw)

    def __enter__(self) -> "LocalSlurm":
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o711)
        key = r / "munge" / "munge.key"
        self._run("mungekey", "--create", "--keyfile", str(key))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.sock"
        munge_pid = r / "run" / "munged.pid"
        self._run("munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--pid-file={munge_pid}",
                  f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'seed'}")
        self._pidfiles.append(munge_pid)
        port = _free_port_pair()
        conf = f"""ClusterName=moedisttest
SlurmctldHost={self.host}
SlurmctldPort={port}
SlurmdPort={port + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=6
MpiDefault=none
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        (r / "slurm.conf").write_text(conf)
        self._run("slurmctld", "-f", str(r / "slurm.conf"))
        self._pidfiles.append(r / "run" / "slurmctld.pid")
        self._run("slurmd", "-f", str(r / "slurm.conf"))
        self._pidfiles.append(r / "run" / "slurmd.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self._run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out and out.split()[0] in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node never became idle: {out!r}\n{self.logs()}")

    def logs(self) -> str:
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                text.append(f"--- {name}\n" + p.read_text()[-3000:])
        return "\n".join(text)

    def sbatch_wait(self, args: list, env: dict = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """`sbatch -W ARGS` (waits for the job); returns the completed process.

        sbatch -W polls the job at 2 s, then x4 while that stays under MinJobAge/3: MinJobAge=6
        in the conf keeps it at 2 s (the default 300 s adds up to 30 s to every job).
        """
        full_env = dict(self.env, **(env or {}))
        return subprocess.run(["sbatch", "-W", *args], env=full_env, capture_output=True, text=True, timeout=timeout)

    def __exit__(self, *exc) -> None:
        for pidfile in reversed(self._pidfiles):
            try:
                os.kill(int(Path(pidfile).read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65000:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair")
