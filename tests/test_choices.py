"""One source for every closed set of names: `moedist.choices` (torch-free), used by config and code."""
import dataclasses
import subprocess
import sys

import pytest

from moedist import choices as C
from moedist import config as cfgmod


def test_config_choices_are_the_shared_tuples():
    used = {}
    defaults = cfgmod.MoedistConfig()
    for section in dataclasses.fields(defaults):
        if not dataclasses.is_dataclass(getattr(defaults, section.name)):
            continue
        for f in dataclasses.fields(getattr(defaults, section.name)):
            if f.metadata.get("choices") is not None:
                used[f"{section.name}.{f.name}"] = f.metadata["choices"]
    shared = {id(v) for k, v in vars(C).items() if k.isupper()}
    stray = [k for k, v in used.items() if id(v) not in shared]
    assert not stray, f"config keys with their own choices tuple (put it in moedist/choices.py): {stray}"
    assert used["moe.drop_policy"] is C.DROP_POLICIES and used["lora.mode"] is C.LORA_MODES


def test_parts_check_against_the_same_tuples():
    from moedist.models import act_ckpt, build
    from moedist.moe import capacity, ffn, groups, layer, router

    assert capacity.DROP_POLICIES is C.DROP_POLICIES and layer.AUX_LOSS_TYPES is C.AUX_LOSS_TYPES
    assert layer.ROUTER_TYPES is C.ROUTER_TYPES and router.SCORE_FUNCS is C.SCORE_FUNCS
    assert router.SECOND_EXPERT_POLICIES is C.SECOND_EXPERT_POLICIES and groups.GROUP_ROUTING is C.GROUP_ROUTING
    assert build.LORA_MODES is C.LORA_MODES and act_ckpt.MODES is C.ACT_CKPT_MODES
    assert tuple(ffn.GATED) == C.GATED_ACTIVATIONS and tuple(ffn.PLAIN) == C.PLAIN_ACTIVATIONS
    assert set(C.MODEL_ACTIVATIONS) <= set(C.ACTIVATIONS)


@pytest.mark.parametrize("module", ["moedist.choices", "moedist.config"])
def test_torch_free(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} imports torch"
