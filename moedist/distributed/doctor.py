"""`moedist doctor`: what a bug report needs, and a check that the fabric works.

    moedist doctor                                         # one process: versions + checks on a world of 1
    torchrun --nproc_per_node 2 -m moedist doctor          # every launcher: torchrun, deepspeed, mpirun, srun
    mpirun -np 2 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29511 python -m moedist doctor
    moedist doctor --timeout-s 10 --size-mb 64 --iters 20

Rank 0 prints one `key  value` row per fact (versions of torch, DeepSpeed, CUDA, NCCL and
MPI; the launcher `detect_launch_env` found; rank, world and local sizes; the network
interface the backend will use), a row per rank (host, local rank, interface), then one
verdict row per check:

    check all_reduce  ok  float32 x 262144 (1.00 MiB), 5 iters, 0.412 ms/iter, algbw 2.546 GB/s, busbw 2.546 GB/s
    check all_to_all  FAIL  rank 1: all_to_all delivered wrong values (block from rank 0)

and a last `verdict  ok|FAIL` row. The exit code is 0 only when every check passed on
every rank. A rendezvous or collective that does not finish within `--timeout-s` is a
FAIL too (each rank prints its own FAIL row; a watchdog ends a process the backend
cannot interrupt).

The checks are collectives on real data with a known answer (rank r contributes r + 1
to the all-reduce; rank r sends `1000 r + j` to rank j in the all-to-all), timed over
`--iters` repetitions after one warm-up. Bandwidth follows nccl-tests: algbw =
bytes / time; busbw = algbw x 2 (n-1)/n for all-reduce, x (n-1)/n for all-to-all.
"""
from __future__ import annotations

import argparse
import array
import fcntl
import ipaddress
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from importlib import metadata
from typing import List, Mapping, Optional, Tuple

from moedist.distributed.launch_env import DistEnv, detect_launch_env

CHECKS = ("all_reduce", "all_to_all")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist doctor", description="Print versions, launcher, ranks and "
                                "network interface; run a timed all-reduce and all-to-all across the ranks.")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="limit for joining the group and for each collective (default 60)")
    p.add_argument("--size-mb", type=float, default=1.0, help="MiB each rank sends per collective (default 1)")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions after one warm-up (default 5)")
    p.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    return p


def _version(dist_name: str) -> str:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _first_line(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [l.strip() for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    return lines[0] if lines else None


def _tool(name: str) -> Optional[str]:
    beside_python = os.path.dirname(sys.executable)      # a venv's launchers even when not on PATH
    return shutil.which(name) or shutil.which(name, path=beside_python)


def mpi_version() -> str:
    """`mpirun --version`'s first line (importing mpi4py.MPI would initialise MPI in this process)."""
    mpirun = _tool("mpirun")
    if mpirun is None:
        return "not found (no mpirun)"
    return _first_line([mpirun, "--version"]) or f"unknown ({mpirun})"


# ---------------------------------------------------------------- network interface

def _interface_addresses() -> dict:
    """{interface name: IPv4 address} of this host (SIOCGIFADDR per interface)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]   # SIOCGIFADDR
            except OSError:
                continue                                          # no IPv4 address
            out[name] = socket.inet_ntoa(addr)
    return out


def route_interface(addr: str) -> Optional[str]:
    """Name of the interface this host uses to reach `addr`, or None if it cannot tell."""
    ip = shutil.which("ip")
    if ip is not None:
        line = _first_line([ip, "-o", "route", "get", addr]) or ""
        m = re.search(r"\bdev (\S+)", line)
        if m:
            return m.group(1)
    try:
        target = socket.gethostbyname(addr)
        if ipaddress.ip_address(target).is_loopback:
            return "lo"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))                                 # no packet is sent for UDP connect
            local = s.getsockname()[0]
    except OSError:
        return None
    return next((name for name, a in _interface_addresses().items() if a == local), None)


def chosen_interface(environ: Mapping[str, str], env: DistEnv, backend: str) -> str:
    """The interface the backend uses and why: its *_SOCKET_IFNAME, else the route to MASTER_ADDR."""
    var = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    for name in (var, "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if environ.get(name):
            return f"{environ[name]} (from {name})"
    if env.world_size == 1 and not env.master_addr:
        return "none (single process, in-memory store)"
    dev = route_interface(env.master_addr)
    if dev is None:
        return f"unknown (no route found to MASTER_ADDR={env.master_addr})"
    return f"{dev} (routes to MASTER_ADDR={env.master_addr})"


# ---------------------------------------------------------------- checks

class _Watchdog:
    """Ends the process if a step the backend cannot interrupt outlives its limit."""

    def __init__(self, rank: int):
        self.rank, self._timer = rank, None

    def arm(self, what: str, seconds: float) -> None:
        self.disarm()

        def fire():
            sys.stdout.write(f"check {what}  FAIL  rank {self.rank}: no result after {seconds:g}s "
                             "(watchdog; a peer is unreachable or stalled)\nverdict  FAIL\n")
            sys.stdout.flush()
            os._exit(1)

        self._timer = threading.Timer(seconds, fire)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, device) -> float:
    """Seconds per call of `fn` after one warm-up."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / max(iters, 1)


def run_all_reduce(env: DistEnv, numel: int, iters: int, device) -> Tuple[bool, float, str]:
    """Rank r contributes r + 1 everywhere; every element must come back as W (W + 1) / 2."""
    import torch
    import torch.distributed as dist
    w = env.world_size
    src = torch.full((numel,), float(env.rank + 1), device=device)
    buf = torch.empty_like(src)

    def step():
        buf.copy_(src)
        dist.all_reduce(buf)

    secs = _time(step, iters, device)
    want = w * (w + 1) / 2
    ok = bool((buf == want).all().item())
    return ok, secs, "" if ok else f"rank {env.rank}: all_reduce gave {buf[0].item():g}..., expected {want:g}"


def run_all_to_all(env: DistEnv, numel: int, iters: int, device) -> Tuple[bool, float, str]:
    """Rank r sends a block of `1000 r + j` to rank j; block j received must hold `1000 j + r`."""
    import torch
    import torch.distributed as dist
    w, r = env.world_size, env.rank
    block = max(1, numel // w)
    send = torch.cat([torch.full((block,), 1000.0 * r + j, device=device) for j in range(w)])
    recv = torch.empty_like(send)
    secs = _time(lambda: dist.all_to_all_single(recv, send), iters, device)
    want = torch.cat([torch.full((block,), 1000.0 * j + r, device=device) for j in range(w)])
    bad = (recv != want).view(w, block).any(dim=1).nonzero().flatten().tolist()
    return not bad, secs, "" if not bad else f"rank {r}: all_to_all delivered wrong values (block from rank {bad[0]})"


def _bandwidth(name: str, nbytes: int, secs: float, w: int) -> Tuple[float, float]:
    algbw = nbytes / secs / 1e9 if secs > 0 else float("inf")
    factor = 2 * (w - 1) / w if name == "all_reduce" else (w - 1) / w
    return algbw, algbw * factor


# ---------------------------------------------------------------- main

def _info_rows(env: Optional[DistEnv], detect_error: Optional[str]) -> List[Tuple[str, str]]:
    rows = [("python", f"{platform.python_version()} ({sys.executable})"), ("platform", platform.platform())]
    rows += [(d, _version(d)) for d in ("moedist", "torch", "deepspeed", "transformers", "peft", "safetensors",
                                        "numpy", "pyyaml", "mpi4py")]
    try:
        import torch
    except ImportError:
        return rows + [("cuda", "unknown (torch not importable)")]
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    rows.append(("cuda available", str(cuda)))
    rows.append(("cuda version", str(torch.version.cuda) if torch.version.cuda else "none (CPU build of torch)"))
    if cuda:
        rows += [(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else "not available"
    except Exception as err:  # noqa: BLE001 - a CPU build raises here; report, do not stop
        nccl = f"not available ({type(err).__name__})"
    rows.append(("nccl", nccl))
    rows.append(("mpi", mpi_version()))
    rows.append(("dist backends", ", ".join(b for b in ("gloo", "nccl", "mpi")
                                           if getattr(dist, f"is_{b}_available")())))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows.append(("cpus", f"{os.cpu_count()} ({usable} usable by this process)"))
    rows += [(f"which {tool}", _tool(tool) or "not found") for tool in ("torchrun", "deepspeed", "mpirun", "srun")]
    rows.append(("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "unset")))
    if env is None:
        rows.append(("launcher", f"FAIL ({detect_error})"))
    else:
        rows.append(("launcher", env.launcher))
        rows.append(("world size", str(env.world_size)))
        rows.append(("local world size", str(env.local_world_size)))
        if env.master_addr:
            rows.append(("master", f"{env.master_addr}:{env.master_port}"))
    return rows


def _print_rows(rows: List[Tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    # one write: ranks may share the launcher's pipe
    sys.stdout.write("".join(f"{key:<{width}}  {value}\n" for key, value in rows))
    sys.stdout.flush()


def main(argv: List[str]) -> int:
    """Entry point of `moedist doctor`; returns 0 when every check passed on every rank."""
    args = _parser().parse_args(argv)
    if args.timeout_s <= 0 or args.iters < 1 or args.size_mb <= 0:
        print("moedist doctor: --timeout-s, --iters and --size-mb must be positive", file=sys.stderr)
        return 2
    try:
        env, detect_error = detect_launch_env(os.environ), None
    except ValueError as err:
        env, detect_error = None, str(err)
    rank = env.rank if env is not None else 0
    if rank == 0:
        _print_rows(_info_rows(env, detect_error))
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return 1
    if env is None:
        _print_rows([("verdict", "FAIL")])
        return 1

    from moedist.distributed.launch_env import init_distributed
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    iface = chosen_interface(os.environ, env, backend)
    watchdog = _Watchdog(rank)
    created = not dist.is_initialized()
    watchdog.arm("init_process_group", args.timeout_s * 2 + 10)
    try:
        env = init_distributed(backend=backend, timeout_s=args.timeout_s)
    except Exception as err:  # noqa: BLE001 - any failure to join is the verdict
        watchdog.disarm()
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        _print_rows([("check init_process_group", f"FAIL  rank {rank}: {detail} "
                      f"(MASTER_ADDR={env.master_addr or '-'} MASTER_PORT={env.master_port or '-'}, "
                      f"timeout {args.timeout_s:g}s)"), ("verdict", "FAIL")])
        return 1
    watchdog.disarm()
    device = torch.device("cuda", torch.cuda.current_device()) if env.backend == "nccl" else torch.device("cpu")

    try:
        return _checks(args, env, iface, device, watchdog)
    finally:
        watchdog.disarm()
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _checks(args, env: DistEnv, iface: str, device, watchdog: _Watchdog) -> int:
    import torch
    import torch.distributed as dist
    w = env.world_size
    # the per-rank rows also prove that every rank joined
    me = f"host {socket.gethostname()}, local rank {env.local_rank}/{env.local_world_size}, interface {iface}"
    watchdog.arm("gather", args.timeout_s + 10)
    everyone: List[Optional[str]] = [None] * w
    try:
        dist.all_gather_object(everyone, me)
    except Exception as err:  # noqa: BLE001
        _print_rows([("check gather", f"FAIL  rank {env.rank}: {str(err).strip()[:300]}"), ("verdict", "FAIL")])
        return 1
    watchdog.disarm()
    rows = [("backend", f"{env.backend} on {device}"), ("interface", iface)]
    rows += [(f"rank {r}", text) for r, text in enumerate(everyone)]

    numel = max(w, int(args.size_mb * 2**20) // 4)                # float32
    numel -= numel % w
    nbytes = numel * 4
    all_ok = True
    for name, fn in (("all_reduce", run_all_reduce), ("all_to_all", run_all_to_all)):
        watchdog.arm(name, args.timeout_s * (args.iters + 1) + 10)
        try:
            ok, secs, why = fn(env, numel, args.iters, device)
            # every rank's verdict and the slowest rank's time
            flags = torch.tensor([0.0 if ok else 1.0, secs], dtype=torch.float64, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad_somewhere, secs = bool(flags[0].item()), float(flags[1].item())
        except Exception as err:  # noqa: BLE001 - a timeout or a lost peer is a FAIL, not a traceback
            watchdog.disarm()
            _print_rows([(f"check {name}", f"FAIL  rank {env.rank}: {(str(err).strip().splitlines() or [''])[0][:300]}"),
                         ("verdict", "FAIL")])
            return 1
        watchdog.disarm()
        if not ok:
            _print_rows([(f"check {name}", f"FAIL  {why}")])
        all_ok = all_ok and not bad_somewhere
        if env.rank == 0:
            algbw, busbw = _bandwidth(name, nbytes, secs, w)
            verdict = "FAIL" if bad_somewhere else "ok"
            rows.append((f"check {name}", f"{verdict}  float32 x {numel} ({nbytes / 2**20:.2f} MiB), "
                         f"{args.iters} iters, {secs * 1e3:.3f} ms/iter, algbw {algbw:.3f} GB/s, "
                         f"busbw {busbw:.3f} GB/s"))
    if env.rank == 0:
        rows.append(("verdict", "ok" if all_ok else "FAIL"))
        _print_rows(rows)
    return 0 if all_ok else 1
