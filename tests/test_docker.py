"""The Dockerfiles pass hadolint (building needs a registry the CI machines cannot reach)."""
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
