"""The READMEs as a user runs them (issue 17, Deliver 7): their shell blocks, in order, in a fresh directory.

Each test takes the ```bash blocks of one README section, runs every command line (comments and
blank lines dropped) with `moedist` and `python` from this venv, in a temporary directory holding a
link to `configs/`, and fails on the first non-zero exit, naming the command. Lines that need what
a CPU box here does not have (sbatch, docker, the launch/ wrappers, which tests/test_launchers.py and
test_slurm.py run) are skipped by prefix. Wall times are printed (`pytest -s`), appended to
`readme-times.txt` beside the test's temporary directory (the session's pytest base directory), and
to $MOEDIST_README_TIMES when set.
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
        note = f"{time.perf_counter() - t0:7.1f} s  {cmd}"
        for path in (cwd.parent / "readme-times.txt", os.environ.get("MOEDIST_README_TIMES")):
            if path:
                with open(path, "a") as fh:  # line by line: a failing command still leaves the earlier times
                    fh.write(f"{cwd.name}\t{note}\n")
    print("\n" + "\n".join(f"{dt:7.1f} s  {cmd}" for cmd, dt in times))
    return times


def test_blocks_are_found():
    cmds = bash_blocks(ROOT / "README.md", "Models in and out")
    assert any(c.startswith("moedist eval ") for c in cmds) and len(cmds) >= 10
    assert bash_blocks(ROOT / "README.md", "Training")[0] == "moedist train configs/tiny.yaml"


def python_block(readme: Path, section: str) -> str:
    """The first ```python block under the `## section` heading of `readme`."""
    text = readme.read_text()
    start = re.search(rf"^#+ {re.escape(section)}", text, re.M).start()
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_run_all_records_each_wall_time(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEDIST_README_TIMES", raising=False)
    work = tmp_path / "w"
    work.mkdir()
    times = run_all(["true", "sleep 0.3"], work)
    assert [c for c, _ in times] == ["true", "sleep 0.3"] and times[1][1] >= 0.3
    lines = (tmp_path / "readme-times.txt").read_text().splitlines()
    assert [ln.split(" s  ", 1)[1] for ln in lines] == ["true", "sleep 0.3"]
    assert all(ln.startswith("w\t") for ln in lines)
    (tmp_path / "w2").mkdir()
    with pytest.raises(AssertionError, match="exit 3"):
        run_all(["exit 3"], tmp_path / "w2")


def test_ten_lines_of_python(tmp_path):
    code = python_block(ROOT / "README.md", "Ten lines of Python")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), "the example prints the per-expert token counts"


def test_memory_and_scale_section(tmp_path):
    cmds = bash_blocks(ROOT / "README.md", "Memory and scale")
    assert cmds and all(c.startswith("moedist plan ") for c in cmds)
    run_all(cmds, tmp_path)


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


@pytest.mark.slow
def test_lifelong_learning(tmp_path):
    """Expert groups, grow, training the grown model with old experts frozen, extract --domain, eval."""
    cmds = bash_blocks(ROOT / "README.md", "Lifelong learning")
    end = next(i for i, c in enumerate(cmds) if c.startswith("moedist eval runs/code_only"))
    cmds = cmds[:end + 1]  # the first subsection's journey (averaging and merging have their own tests)
    assert any(c.startswith("moedist grow ") for c in cmds) and any("--domain" in c for c in cmds)
    run_all(cmds, tmp_path)
