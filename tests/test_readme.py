"""The READMEs as a user runs them (issue 17, Deliver 7): their shell blocks, in order, in a fresh directory.

Each test takes the ```bash blocks of one README section, runs every command line (comments and
blank lines dropped) with `moedist` and `python` from this venv, in a temporary directory holding a
link to `configs/`, and fails on the first non-zero exit, naming the command. Lines that need what
a CPU box here does not have (sbatch, docker, the launch/ wrappers, which tests/test_launchers.py and
test_slurm.py run) are skipped by prefix. Wall times are printed (`pytest -s`) and written to
$MOEDIST_README_TIMES when set.
"""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("sbatch", "docker", "launch/", "make ", "python -c")   # run by their own tests / need network or GPUs


def bash_blocks(readme: Path, section: str):
    """Command lines of the ```bash blocks under the `## section` heading of `readme`."""
    text = readme.read_text()
    start = re.search(rf"^#+ {re.escape(section)}", text, re.M).start()
    end = text.find("\n## ", start + 1)
    body = text[start:end if end >= 0 else None]
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in block.splitlines():
            line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
            if line and not line.startswith(SKIP):
                cmds.append(line)
    return cmds


def run_all(cmds, cwd: Path, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    (cwd / "configs").symlink_to(ROOT / "configs")
    times = []
    for cmd in cmds:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                             executable="/bin/bash")
        times.append((cmd, time.perf_counter() - t0))
        assert res.returncode == 0, f"README command failed (exit {res.returncode}): {cmd}\n{res.stderr[-3000:]}"
    note = "\n".join(f"{dt:7.1f} s  {cmd}" for cmd, dt in times)
    print("\n" + note)
    if os.environ.get("MOEDIST_README_TIMES"):
        with open(os.environ["MOEDIST_README_TIMES"], "a") as fh:
            fh.write(note + "\n")
    return times


def test_blocks_are_found():
    cmds = bash_blocks(ROOT / "README.md", "Models in and out")
    assert any(c.startswith("moedist eval ") for c in cmds) and len(cmds) >= 10
    assert bash_blocks(ROOT / "README.md", "Training")[0] == "moedist train configs/tiny.yaml"


def test_training_section(tmp_path):
    cmds = [c for c in bash_blocks(ROOT / "README.md", "Training")
            if "configs/demo.yaml" not in c]  # the demo config's 300-step LoRA-MoE: moedist demo, test_demo.py
    run_all(cmds + ["moedist eval runs/tiny --json"], tmp_path)


@pytest.mark.slow
def test_configs_readme(tmp_path):
    run_all(bash_blocks(ROOT / "configs" / "README.md", "Configs"), tmp_path)


@pytest.mark.slow
def test_models_in_and_out(tmp_path):
    run_all(bash_blocks(ROOT / "README.md", "Models in and out"), tmp_path)


@pytest.mark.slow
def test_fine_tune_a_hugging_face_model(tmp_path):
    """The HF journey, with the demo's data files (step 2 of the README writes them with moedist demo --hf)."""
    from moedist.train.demo_hf import write_demo_data

    cmds = bash_blocks(ROOT / "README.md", "Fine-tune a Hugging Face model")
    write_demo_data(tmp_path / "runs" / "hf_demo" / "data")
    steps = ["train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.save_every=4"]
    cmds = [c + " " + " ".join(steps) if " train configs/hf_finetune.yaml" in c else c for c in cmds]
    run_all(cmds, tmp_path)
