"""Import rules of DESIGN.md that the code must keep: DeepSpeed lives in one module of train/,
and layers/ + moe/ never touch torch.distributed (they get a communicator)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "moedist"


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _offenders(folder: str, banned: str) -> list:
    return [f"{p.relative_to(PKG.parent)} imports {n}" for p in sorted((PKG / folder).rglob("*.py"))
            for n in sorted(_imports(p)) if n == banned or n.startswith(banned + ".")]


@pytest.mark.parametrize("folder", ["distributed", "moe", "layers", "models", "checkpoint", "data"])
def test_deepspeed_only_in_train(folder):
    assert not _offenders(folder, "deepspeed")


@pytest.mark.parametrize("folder", ["moe", "layers"])
def test_parts_never_import_torch_distributed(folder):
    assert not _offenders(folder, "torch.distributed")


def test_the_rule_sees_an_import(tmp_path, monkeypatch):
    bad = tmp_path / "moedist" / "distributed"
    bad.mkdir(parents=True)
    (bad / "x.py").write_text("def f():\n    from deepspeed.utils import groups\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "moedist")
    assert _offenders("distributed", "deepspeed") == ["moedist/distributed/x.py imports deepspeed.utils"]


def test_deepspeed_internals_stay_in_the_deepspeed_modules():
    """Inside train/ only the DeepSpeed modules import deepspeed; checkpointing, export, averaging,
    evaluation and the trainer reach the engine only through the runner interface (`train/state.py`)."""
    ds_modules = {"deepspeed_setup.py", "deepspeed_runner.py"}
    assert [o for o in _offenders("train", "deepspeed") if Path(o.split()[0]).name not in ds_modules] == []
    for name in ("checkpointing", "export", "averaging", "evaluate", "trainer"):
        source = (PKG / "train" / f"{name}.py").read_text()
        assert "deepspeed_setup" not in source and "deepspeed_runner" not in source, name
