"""Find out who launched this process and join the process group.

The same `moedist train CONFIG` runs under torchrun, the DeepSpeed launcher,
`mpirun` (Open MPI, MPICH/Intel MPI), `srun` and as a plain single process.
Each launcher announces rank and size through different environment
variables; `detect_launch_env` maps them to one `DistEnv` (a pure function of
the environment, tested without starting processes) and `init_distributed`
joins the group.

Detection order (the first match wins, because launchers nest: `srun torchrun`
and `mpirun` inside an sbatch job both carry SLURM_* variables too):

1. torchrun / DeepSpeed launcher / anything torch-style: RANK, WORLD_SIZE, LOCAL_RANK
2. Open MPI: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
3. MPICH, Intel MPI (Hydra): PMI_RANK / PMI_SIZE, MPI_LOCALRANKID / MPI_LOCALNRANKS
4. SLURM srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
5. none of these: a single process (world size 1)

A single process still gets a real process group (world size 1, backed by an
in-memory `HashStore`, so no port is opened and none can clash): code after
`init_distributed` may call collectives, build `ParallelDims` or hand the
group to DeepSpeed without special cases.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, List, Mapping, Optional

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# srun gives every task of a job the same SLURM_JOB_ID, so a port derived from it
# agrees across nodes without any exchange, and two jobs sharing a node rarely clash.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 10000

# Variables that init_distributed exports for MPI and SLURM launches, so that code
# reading the torch-style environment (DeepSpeed's engine reads LOCAL_RANK) agrees.
_TORCH_STYLE_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 <= rank < world_size.
        world_size: number of processes in the job.
        local_rank: rank among the processes on this node (selects the GPU).
        local_world_size: number of processes on this node.
        launcher: who started us: "torchrun", "deepspeed", "env" (RANK/WORLD_SIZE set
            by something else), "openmpi", "mpich", "slurm", "single", or
            "preinitialized" (the group existed before init_distributed and does not
            match the environment).
        master_addr: address of rank 0's rendezvous store ("" for a single process).
        master_port: port of that store (0 for a single process).
        backend: torch.distributed backend once initialised; None from detection.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    master_addr: str = ""
    master_port: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs and writes files)."""
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is required by this launcher but is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _port_var(environ: Mapping[str, str], default: int) -> int:
    port = _int_var(environ, "MASTER_PORT", default)
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} must be in 1..65535")
    return port


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM hostlist expression into host names, in order.

    `"node[01-03,7],gpu5"` -> `["node01", "node02", "node03", "node7", "gpu5"]`;
    several bracket groups in one name give their product
    (`"r[1-2]n[1-2]"` -> r1n1, r1n2, r2n1, r2n2). Zero padding is kept.

    Raises:
        ValueError: on an empty list, unbalanced brackets or a bad range.
    """
    hosts: List[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_one(item, nodelist))
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def _split_top_level(text: str) -> List[str]:
    """Split at commas that are not inside [...]."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"SLURM_JOB_NODELIST={text!r} has unbalanced or nested brackets")
    if depth != 0:
        raise ValueError(f"SLURM_JOB_NODELIST={text!r} has unbalanced brackets")
    items.append(text[start:])
    return [s.strip() for s in items if s.strip()]


def _expand_one(item: str, whole: str) -> List[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"SLURM_JOB_NODELIST={whole!r} has a bad range {part!r}; expected N or N-M")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(head + str(n).zfill(width) + rest for rest in _expand_one(tail, whole))
    return out


def _tasks_on_node(tasks_per_node: str, node_id: int) -> Optional[int]:
    """Tasks on node `node_id` from SLURM's compressed form, e.g. `"2(x3),1"`."""
    counts: List[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node_id] if 0 <= node_id < len(counts) else None


def scontrol_hostnames(nodelist: str) -> Optional[List[str]]:
    """Host names from `scontrol show hostnames`, or None without a working scontrol."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = out.split()
    return hosts or None


def detect_launch_env(environ: Mapping[str, str],
                      resolve_hostnames: Optional[Callable[[str], Optional[List[str]]]] = None) -> DistEnv:
    """Rank, sizes and rendezvous address from the launcher's environment variables.

    Pure apart from `resolve_hostnames` (used for SLURM only; `init_distributed` passes
    `scontrol_hostnames`; None or a None result falls back to `expand_nodelist`).

    Args:
        environ: the environment, e.g. `os.environ`.
        resolve_hostnames: optional nodelist -> host names function.

    Returns:
        A `DistEnv` with `backend=None`.

    Raises:
        ValueError: on missing, non-integer or inconsistent variables, naming them.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
        if "TORCHELASTIC_RUN_ID" in environ:
            launcher = "torchrun"
        elif "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
            launcher = "deepspeed"
        else:
            launcher = "env"
        local_size_var = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in environ else "LOCAL_SIZE"
        env = _local(environ, launcher, rank, world, ("RANK", "WORLD_SIZE"), "LOCAL_RANK", local_size_var)
        return dataclasses.replace(env, master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
                                   master_port=_port_var(environ, DEFAULT_MASTER_PORT))

    if "OMPI_COMM_WORLD_RANK" in environ:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
        env = _local(environ, "openmpi", _int_var(environ, names[0]), _int_var(environ, names[1]), names,
                     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
        return _mpi_master(environ, env)

    if "PMI_RANK" in environ:
        names = ("PMI_RANK", "PMI_SIZE")
        env = _local(environ, "mpich", _int_var(environ, names[0]), _int_var(environ, names[1]), names,
                     "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
        return _mpi_master(environ, env)

    if "SLURM_PROCID" in environ:
        names = ("SLURM_PROCID", "SLURM_NTASKS")
        rank, world = _int_var(environ, names[0]), _int_var(environ, names[1])
        local_size, spec_var = None, None
        if "SLURM_STEP_TASKS_PER_NODE" in environ or "SLURM_TASKS_PER_NODE" in environ:
            spec_var = "SLURM_STEP_TASKS_PER_NODE" if environ.get("SLURM_STEP_TASKS_PER_NODE") \
                else "SLURM_TASKS_PER_NODE"
            spec = environ[spec_var]
            node_id = _int_var(environ, "SLURM_NODEID", 0)
            local_size = _tasks_on_node(spec, node_id)
            if local_size is None:
                raise ValueError(f"{spec_var}={spec!r} gives no task count for SLURM_NODEID={node_id}; "
                                 "expected e.g. '2(x3),1'")
        env = _local(environ, "slurm", rank, world, names, "SLURM_LOCALID", None, local_size,
                     local_size_source=spec_var)
        addr = environ.get("MASTER_ADDR")
        if not addr:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("SLURM launch without MASTER_ADDR needs SLURM_JOB_NODELIST to find rank 0's host")
            hosts = (resolve_hostnames(nodelist) if resolve_hostnames else None) or expand_nodelist(nodelist)
            addr = hosts[0]
        if "SLURM_JOB_ID" in environ:
            default_port = SLURM_PORT_BASE + _int_var(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        else:
            default_port = DEFAULT_MASTER_PORT
        return dataclasses.replace(env, master_addr=addr, master_port=_port_var(environ, default_port))

    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")


def _local(environ: Mapping[str, str], launcher: str, rank: int, world: int, names: tuple,
           local_rank_var: str, local_size_var: Optional[str], local_size: Optional[int] = None,
           local_size_source: Optional[str] = None) -> DistEnv:
    """Validate rank/world and fill in the node-local pair.

    Without a local-size variable the job is assumed to be on one node
    (local size = world size, local rank = rank), which is what every
    launcher above does when it runs on one machine.
    """
    if world < 1:
        raise ValueError(f"{names[1]}={world} must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"{names[0]}={rank} must be in 0..{world - 1} ({names[1]}={world})")
    source = local_size_source or "local world size"
    if local_size_var is not None and local_size_var in environ:
        local_size, source = _int_var(environ, local_size_var), local_size_var
    if local_size is None:
        local_size = world
    # Checked before it divides anything: LOCAL_WORLD_SIZE=0 used to be a ZeroDivisionError.
    if not 1 <= local_size <= world:
        raise ValueError(f"{source}={local_size} (processes on this node) must be in 1..{world} "
                         f"({names[1]}={world})")
    local_rank = _int_var(environ, local_rank_var, rank % local_size)
    if not 0 <= local_rank < local_size:
        raise ValueError(f"{local_rank_var}={local_rank} must be in 0..{local_size - 1} "
                         f"(local world size {local_size})")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_size,
                   launcher=launcher)


def _mpi_master(environ: Mapping[str, str], env: DistEnv) -> DistEnv:
    addr = environ.get("MASTER_ADDR")
    if not addr:
        if env.local_world_size < env.world_size:
            # 127.0.0.1 would make every node rendezvous with itself and hang.
            raise ValueError(f"MASTER_ADDR is not set for a {env.launcher} job spanning several nodes "
                             f"(world size {env.world_size}, {env.local_world_size} on this node); "
                             "export it to every rank (mpirun -x MASTER_ADDR=<rank-0 host>)")
        addr = DEFAULT_MASTER_ADDR
    return dataclasses.replace(env, master_addr=addr, master_port=_port_var(environ, DEFAULT_MASTER_PORT))


def default_backend(cuda_available: bool) -> str:
    """nccl with CUDA, gloo without."""
    return "nccl" if cuda_available else "gloo"


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the default process group for whatever launched us.

    Idempotent: if torch.distributed is already initialised, nothing is created and
    the existing group's rank, size and backend are returned.

    For Open MPI, MPICH and SLURM launches the torch-style variables (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are
    exported into `os.environ`, as DeepSpeed's own MPI discovery does, so that
    libraries reading them (DeepSpeed's engine reads LOCAL_RANK) agree. A
    single process leaves the environment untouched and gets a world-size-1
    group on an in-memory store.

    Args:
        backend: "nccl", "gloo", ... ; None picks nccl when CUDA is available, else gloo.
            With nccl the current CUDA device is set to `local_rank`.
        timeout_s: collective and rendezvous timeout in seconds.

    Returns:
        The `DistEnv` of this process, with `backend` filled in.

    Raises:
        ValueError: inconsistent launcher environment, a non-positive timeout, or nccl
            without enough CUDA devices for `local_rank`.
    """
    import torch
    import torch.distributed as dist

    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if dist.is_initialized():
        # The existing group is the truth; the environment only adds the node-local pair.
        rank, world = dist.get_rank(), dist.get_world_size()
        try:
            env = detect_launch_env(os.environ)
        except ValueError:
            env = None
        if env is None or (rank, world) != (env.rank, env.world_size):
            env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                          launcher="preinitialized")
        return dataclasses.replace(env, backend=dist.get_backend())

    env = detect_launch_env(os.environ, resolve_hostnames=scontrol_hostnames)

    backend = backend or default_backend(torch.cuda.is_available())
    if "nccl" in backend:
        if not torch.cuda.is_available() or env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"backend={backend!r} needs a CUDA device for local rank {env.local_rank}; "
                             f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(seconds=timeout_s)

    if env.launcher in ("openmpi", "mpich", "slurm"):
        values = (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr,
                  env.master_port)
        os.environ.update({k: str(v) for k, v in zip(_TORCH_STYLE_VARS, values)})
    if env.launcher == "single" or env.world_size == 1:
        # one process needs no rendezvous: an in-memory store binds no port (a fixed MASTER_PORT
        # left in the environment, e.g. by DeepSpeed, would collide between concurrent runs)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{_url_host(env.master_addr)}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    return dataclasses.replace(env, backend=dist.get_backend())


class CollectiveError(RuntimeError):
    """A collective failed because another rank stalled or died; `str()` is one line
    naming this rank, the rank(s) it waited for and the timeout."""


# What gloo and NCCL say (the text is all they give; they never name the peer's rank).
_TIMEOUT_MARKERS = ("timed out", "timeout")
_PEER_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                      "connection refused", "communicator was aborted", "remote process exited")


def describe_collective_failure(message: str, env: DistEnv, timeout_s: float) -> Optional[str]:
    """One line naming who waited for whom, or None if `message` is not a peer failure.

    gloo's own text is e.g. `Timed out waiting 5000ms for recv operation to complete` or
    `Connection closed by peer [127.0.0.1]:7808`: no rank. In a world of two the peer is
    known; in larger worlds we say how many ranks it could have been.
    """
    text = message.lower()
    if env.world_size == 2:
        peer = f"rank {1 - env.rank}"
    else:
        peer = f"another rank (one of the other {env.world_size - 1})"
    first_line = (message.strip().splitlines() or [""])[0]
    detail = re.sub(r"^\[[^\]]*\]\s*", "", first_line)  # drop gloo's "[/path/pair.cc:553]" prefix
    if any(m in text for m in _PEER_LOST_MARKERS):
        return (f"rank {env.rank}: {peer} died or left during a collective (backend: {detail}); "
                "check that rank's log")
    if any(m in text for m in _TIMEOUT_MARKERS):
        return (f"rank {env.rank}: collective timed out after {timeout_s:g}s waiting for {peer} "
                f"(parallel.timeout_s={timeout_s:g}; backend: {detail}); that rank stalled or died")
    return None


@contextlib.contextmanager
def collective_errors(env: DistEnv, timeout_s: float) -> Iterator[None]:
    """Re-raise a collective that failed on a stalled or dead peer as a `CollectiveError`.

    The backend's exception (a RuntimeError subclass) says neither our rank nor whose data
    it waited for; the job's logs then show one line per surviving rank that does.

        with collective_errors(env, cfg.parallel.timeout_s):
            Trainer(cfg).train()
    """
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:
        message = describe_collective_failure(str(err), env, timeout_s)
        if message is None:
            raise
        raise CollectiveError(message) from err


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
