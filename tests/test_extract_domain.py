"""`moedist extract CKPT --domain NAME OUT` (issue 14.4): the sub-model of one domain gives the full model's
logits on that domain's data (learned and random group routing, dropless and with a capacity factor), and
`moedist eval` reports the same val_loss_<name> for both."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from tests._lifelong import base_cfg, write_domains


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    return root, write_domains(root / "text"), str(root / "cache")


def _checkpoint(root, paths, cache, label: str, **moe):
    """A full checkpoint of a grouped model whose routers are decisive (weights x 30)."""
    from moedist.checkpoint.io import save_checkpoint
    from moedist.config import config_from_dict
    from moedist.models.build import build_model, moe_layers

    cfg_dict = base_cfg(paths, cache, **moe)
    cfg_dict["moe"]["freeze_experts"] = [5]
    model = build_model(config_from_dict(cfg_dict))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(30.0)
            for p in layer.experts.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))   # experts differ from each other
    save_checkpoint(root / label, model, step=0, config=cfg_dict)
    return cfg_dict, model


def _load(path):
    from moedist.checkpoint import load_checkpoint
    from moedist.checkpoint.io import read_manifest
    from moedist.config import config_from_dict
    from moedist.models.build import build_model

    m = read_manifest(path)
    model = build_model(config_from_dict(m["config"]))
    with torch.random.fork_rng(devices=[]):
        load_checkpoint(path, model, load_optim=False)
    return model.eval(), m["config"]


@pytest.mark.parametrize("label,moe", [("learned", {}), ("random", {"group_routing": "random"}),
                                       ("capacity", {"capacity_factor": 1.0, "min_capacity": 1})])
def test_sub_model_logits_equal_the_full_model(domains, label, moe):
    from moedist.checkpoint.cli import main_extract
    from moedist.config import config_from_dict
    from moedist.data.dataset import build_data

    root, paths, cache = domains
    cfg_dict, full = _checkpoint(root, paths, cache, f"full_{label}", **moe)
    out = root / f"code_{label}"
    assert main_extract([str(root / f"full_{label}"), "--domain", "code", str(out)]) == 0
    sub, sub_cfg = _load(out)
    assert sub_cfg["moe"]["num_experts"] == 4 and sub_cfg["moe"]["expert_groups"] == {"code": [0, 1, 2, 3]}
    assert sub_cfg["moe"]["freeze_experts"] == [1]                        # old 5 = group member 1
    assert [s["name"] for s in sub_cfg["data"]["sources"]] == ["code"]
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in full.parameters())
    data = build_data(config_from_dict(cfg_dict))
    batch = data.val_micro("code", 0, 4)                                 # packed: positions and segments
    full.eval()
    with torch.no_grad():
        want = full(batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids,
                    domain_ids=batch.domain_ids).logits
        got = sub(batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids,
                  domain_ids=torch.zeros_like(batch.domain_ids)).logits
        other = full(batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids,
                     domain_ids=torch.zeros_like(batch.domain_ids)).logits   # as if it were prose
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
    assert not torch.allclose(other, want, atol=1e-3)                    # the group matters on this data


def test_eval_reports_the_same_domain_loss(domains, capsys):
    from moedist.checkpoint.cli import main_extract
    from moedist.train.evaluate import main_eval

    root, paths, cache = domains
    _checkpoint(root, paths, cache, "full_eval")
    assert main_extract([str(root / "full_eval"), "--domain", "prose", str(root / "prose_eval")]) == 0
    capsys.readouterr()
    vals = []
    for target in ("full_eval", "prose_eval"):
        assert main_eval([str(root / target), "--json"]) == 0
        vals.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert set(vals[0]) >= {"val_loss_prose", "val_loss_code"} and "val_loss_code" not in vals[1]
    assert abs(vals[0]["val_loss_prose"] - vals[1]["val_loss_prose"]) <= 1e-6


def test_bad_domain_is_one_line_and_writes_nothing(domains, capsys):
    from moedist.checkpoint.cli import main_extract

    root, paths, cache = domains
    _checkpoint(root, paths, cache, "full_bad")
    out = root / "nothing"
    assert main_extract([str(root / "full_bad"), "--domain", "nope", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--domain=nope: CKPT's config has no group 'nope'" in err
    assert not out.exists()


def test_to_hf_warns_that_groups_are_dropped_unless_extracted(domains, capsys):
    from moedist.checkpoint.cli import main_extract
    from moedist.models.convert_cli import main as convert

    root, paths, cache = domains
    _checkpoint(root, paths, cache, "full_hf")
    assert main_extract([str(root / "full_hf"), "--domain", "code", str(root / "code_hf")]) == 0
    capsys.readouterr()
    assert convert(["to-hf", str(root / "full_hf"), str(root / "hf_full")]) == 0
    assert "expert_groups / group_routing are not part of the Hugging Face format" in capsys.readouterr().err
    assert convert(["to-hf", str(root / "code_hf"), str(root / "hf_code")]) == 0
    assert "expert_groups" not in capsys.readouterr().err
