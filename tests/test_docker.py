"""The Dockerfiles pass hadolint; docker/Dockerfile is built and run for real (slow; see below)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_lints_clean(name):
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([exe, str(ROOT / "docker" / name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_installs_torch_before_deepspeed(name):
    text = (ROOT / "docker" / name).read_text()
    assert text.index("torch==2.13.0") < text.index('pip install ".[mpi]"')


def dockerfile_train_example() -> str:
    """The `docker run ... train` example of docker/Dockerfile's comments, continuation lines joined."""
    comments = [ln[1:].strip() for ln in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
                if ln.startswith("#")]
    text = "\n".join(comments).replace("\\\n", " ")
    (cmd,) = [ln for ln in text.splitlines() if "docker run" in ln and " train " in ln]
    return cmd


def test_readmes_show_the_dockerfile_train_example():
    """docker/README.md and launch/README.md give the same command as the Dockerfile (which is run below)."""
    cmd = " ".join(dockerfile_train_example().split())
    for readme in ("docker/README.md", "launch/README.md"):
        text = " ".join((ROOT / readme).read_text().replace("\\\n", " ").split())
        assert cmd in text, (readme, cmd)


# ---------------------------------------------------------------------------------------------
# Built and run for real (slow suite): a private dockerd (tests/dockerd.py), a debootstrapped
# base image passed as BASE_IMAGE, the host's torch 2.13.0 CPU wheel and every dependency
# served to `docker build --network host` as a find-links wheelhouse; then `moedist doctor`,
# a 2-process EP=2 training in one container, and two containers as two nodes on a
# user-defined bridge network, whose losses equal the same job on the host (1e-5); and the
# Dockerfile's own training example, run as written by a host user.
# Cached under ~/.cache/moedist/docker (base tarball, wheelhouse, image layers in the data root).

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from moedist.train.metrics import read_metrics  # noqa: E402
from tests import dockerd as dk  # noqa: E402
from tests.test_doctor import checks, rows  # noqa: E402

IMAGE = "moedist:cpu-test"
STEPS = 3
# A corpus file both sides read (the default pydoc source is the interpreter's own text: the host's
# Python 3.11.x and the image's Debian 3.11.2 ship different pydoc_data, hence different batches).
TRAIN = ["train", "configs/tiny.yaml", "parallel.ep_size=2", f"train.max_steps={STEPS}", "train.plot=false",
         "data.source=file"]
# --network none has no address for the container's own name, which torchrun's store needs
LOOPBACK_HOST = ["--network", "none", "--hostname", "moedist", "--add-host", "moedist:127.0.0.1"]
TIMINGS: dict = {}


def _losses(run: Path) -> list:
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    return [r["loss"] for r in recs]


@pytest.fixture(scope="module")
def dockerd():
    why = dk.ensure_requirements()
    if why:
        pytest.fail(why)
    t0 = time.monotonic()
    with dk.Dockerd() as d:
        TIMINGS["dockerd_start_s"] = round(time.monotonic() - t0, 1)
        yield d
    assert d.host_changes() == [], "dockerd left host changes behind"
    print(f"\ndocker timings: {json.dumps(TIMINGS)}")
    (dk.CACHE / "last-timings.json").write_text(json.dumps(TIMINGS) + "\n")


@pytest.fixture(scope="module")
def image(dockerd):
    t0 = time.monotonic()
    TIMINGS["cached_before"] = dockerd.has_image(IMAGE)
    base = dockerd.base_image()
    TIMINGS["base_image_s"] = round(time.monotonic() - t0, 1)
    with dk.Wheelhouse.serve() as links:
        TIMINGS["wheelhouse_s"] = round(time.monotonic() - t0 - TIMINGS["base_image_s"], 1)
        t1 = time.monotonic()
        dockerd.docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                       "--build-arg", f"PIP_FIND_LINKS={links}", "--build-arg", "PIP_NO_INDEX=1",
                       "-f", "docker/Dockerfile", "-t", IMAGE, ".", cwd=ROOT, timeout=1200)
        TIMINGS["build_s"] = round(time.monotonic() - t1, 1)
    TIMINGS["image_total_s"] = round(time.monotonic() - t0, 1)
    return IMAGE


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory):
    """The same job as 2 processes on this host (the reference)."""
    from tests.test_launchers import base_env
    run = tmp_path_factory.mktemp("host") / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moedist", *TRAIN, f"data.path={CORPUS}", f"train.output_dir={run}"], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return _losses(run)


def _out_dir(tmp_path: Path) -> Path:
    """A directory mounted at /out, holding the corpus; the image runs as uid 1000."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    (out / "corpus.txt").write_bytes(CORPUS.read_bytes())
    return out


CORPUS = ROOT / "README.md"


def _run(dockerd, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`docker run --rm --name <unique>`; a run that outlives `timeout` is removed, not left running."""
    name = f"md{os.getpid()}_{random.randint(0, 10**6)}"
    dockerd.containers.append(name)
    try:
        return dockerd.docker("run", "--rm", "--name", name, *args, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        dockerd.docker("rm", "-f", name, check=False)
        raise


@pytest.mark.slow
def test_container_runs_moedist_doctor(image, dockerd):
    res = _run(dockerd, *LOOPBACK_HOST, image, timeout=300)        # CMD: moedist doctor
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = rows(res.stdout)
    assert r["launcher"] == "single" and r["torch"].startswith("2.13.0") and r["verdict"] == "ok"
    assert {k: v[0] for k, v in checks(res.stdout).items()} == {"all_reduce": "ok", "all_to_all": "ok"}

    res = _run(dockerd, *LOOPBACK_HOST, "--shm-size=1g", image, "torchrun", "--standalone", "--nproc_per_node", "2",
               "-m", "moedist", "doctor", "--timeout-s", "60", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = rows(res.stdout)
    assert r["launcher"] == "torchrun" and r["world size"] == "2" and r["verdict"] == "ok", res.stdout[-3000:]
    assert {k: v[0] for k, v in checks(res.stdout).items()} == {"all_reduce": "ok", "all_to_all": "ok"}


@pytest.mark.slow
def test_two_process_training_in_a_container(image, dockerd, one_node_losses, tmp_path):
    out = _out_dir(tmp_path)
    t0 = time.monotonic()
    res = _run(dockerd, *LOOPBACK_HOST, "--shm-size=1g", "-v", f"{out}:/out", "-e", "OMP_NUM_THREADS=1", image,
               "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "moedist", *TRAIN,
               "data.path=/out/corpus.txt", "train.output_dir=/out/run")
    TIMINGS["train_one_container_s"] = round(time.monotonic() - t0, 1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _losses(out / "run") == pytest.approx(one_node_losses, rel=1e-5, abs=1e-6)
    assert (out / "run" / "final" / "manifest.json").exists()


@pytest.mark.slow
def test_two_containers_as_two_nodes(image, dockerd, one_node_losses, tmp_path):
    """torchrun --nnodes 2 (c10d rendezvous on the first container's address) over a user-defined network."""
    out = _out_dir(tmp_path)
    tag = f"md{os.getpid()}_{random.randint(0, 99999)}"
    net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
    addr = [f"{net}.2", f"{net}.3"]
    dockerd.networks.append(tag)
    dockerd.docker("network", "create", "--driver", "bridge", "--subnet", f"{net}.0/24", tag)
    names = [f"{tag}_node{i}" for i in (0, 1)]
    t0 = time.monotonic()
    for i in (0, 1):
        dockerd.containers.append(names[i])
        dockerd.docker("run", "-d", "--name", names[i], "--hostname", f"node{i}", "--network", tag, "--ip", addr[i],
                       "--shm-size=1g", "-v", f"{out}:/out", "-e", "OMP_NUM_THREADS=1", "-e", "GLOO_SOCKET_IFNAME=eth0",
                       image, "torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", f"{addr[0]}:29400", "--rdzv_id", tag, "--rdzv_conf", f"is_host={int(i == 0)}",
                       "--local_addr", addr[i], "-m", "moedist", *TRAIN, "data.path=/out/corpus.txt",
                       "train.output_dir=/out/run")
    codes = [dockerd.docker("wait", n, timeout=600).stdout.strip() for n in names]
    TIMINGS["train_two_containers_s"] = round(time.monotonic() - t0, 1)
    logs = [(lambda r: r.stdout + r.stderr)(dockerd.docker("logs", n, check=False)) for n in names]
    assert codes == ["0", "0"], "\n".join(l[-3000:] for l in logs)
    assert "2 rank(s), EP 2 x EDP 1" in logs[0]
    assert _losses(out / "run") == pytest.approx(one_node_losses, rel=1e-5, abs=1e-6)
    assert (out / "run" / "final" / "manifest.json").exists()
    for n in names:
        dockerd.docker("rm", n)
        dockerd.containers.remove(n)
    dockerd.docker("network", "rm", tag)
    dockerd.networks.remove(tag)


HOST_UID = 1234  # neither root nor the image's uid 1000: what `--user "$(id -u):$(id -g)"` is for
# The private dockerd has no default bridge (it leaves host networking alone), so a container
# started without --network has no address for its own name and torchrun --standalone waits for
# ever; a default docker install gives it one. This shell function adds exactly that, nothing else.
DEFAULT_NETWORK = ('docker() { if [ "$1" = run ]; then shift; command docker run ' + " ".join(LOOPBACK_HOST)
                   + ' "$@"; else command docker "$@"; fi; }')


@pytest.mark.slow
def test_dockerfile_train_example_as_written(image, dockerd):
    """The Dockerfile's own `docker run ... train` line, run as a host user of uid 1234 in an empty
    directory: ./runs/tiny ends up with the run's files, owned by that user."""
    import tempfile

    cmd = dockerfile_train_example()
    assert "moedist:cpu " in cmd and "--user" in cmd
    dockerd.docker("tag", image, "moedist:cpu")
    work = Path(tempfile.mkdtemp(prefix="md_example_"))
    os.chown(work, HOST_UID, HOST_UID)
    sock, sock_dir = dockerd.sock, dockerd.dir
    modes = (sock.stat(), sock_dir.stat())
    os.chown(sock, 0, HOST_UID)  # the test's user may talk to this private daemon only
    sock.chmod(0o660)
    sock_dir.chmod(0o711)
    env = dict(PATH=f"{Path(dockerd.client).parent}:/usr/bin:/bin", HOME=str(work), DOCKER_HOST=f"unix://{sock}",
               DOCKER_BUILDKIT="0", DOCKER_CLI_HINTS="false", LANG="C.UTF-8")
    t0 = time.monotonic()
    try:
        res = subprocess.run(["setpriv", f"--reuid={HOST_UID}", f"--regid={HOST_UID}", "--clear-groups",
                              "bash", "-c", f"set -euo pipefail; {DEFAULT_NETWORK}; {cmd}"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=600)
        TIMINGS["dockerfile_example_s"] = round(time.monotonic() - t0, 1)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        run = work / "runs" / "tiny"
        for name in ("metrics.jsonl", "summary.json", "config.yaml", "plot.png", "final/manifest.json"):
            assert (run / name).is_file(), (name, sorted(p.name for p in run.iterdir()) if run.exists() else None)
            assert (run / name).stat().st_uid == HOST_UID, name
        assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
        # configs with data.sources cache under ~/.cache/moedist (tiny.yaml's pydoc source does not):
        # a --user without a passwd entry still has a writable HOME
        probe = _run(dockerd, *LOOPBACK_HOST, "--user", f"{HOST_UID}:{HOST_UID}", "moedist:cpu", "bash", "-c",
                     "mkdir -p ~/.cache/moedist && touch ~/.cache/moedist/probe && echo $HOME", timeout=120)
        assert probe.returncode == 0 and probe.stdout.strip() == "/home/moedist", probe.stdout + probe.stderr
    finally:
        os.chown(sock, modes[0].st_uid, modes[0].st_gid)
        sock.chmod(modes[0].st_mode & 0o7777)
        sock_dir.chmod(modes[1].st_mode & 0o7777)
        shutil.rmtree(work, ignore_errors=True)
