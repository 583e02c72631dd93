"""moe.expert_groups / moe.group_routing (issue 14.2): masking math by hand, the domain id's path from the
data to every router, and the same training at EP 1 and EP 2 as a single process (gloo, CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from tests._dist import run_workers
from tests._lifelong import GROUPS, base_cfg, with_world, write_domains


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    return write_domains(root / "text"), str(root / "cache")


# ------------------------------------------------------------------ pure math against hand computation

def test_learned_mask_matches_hand_softmax_over_the_group():
    from moedist.moe.router import Router

    r = Router(3, 4, top_k=2, seed=0)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[3.0, 0, 0], [1.0, 0, 0], [0.5, 0, 0], [2.0, 0, 0]]))   # logits = 3, 1, .5, 2
    x = torch.tensor([[1.0, 0.0, 0.0]])
    allowed = torch.tensor([[False, True, True, True]])            # group [1, 2, 3]: the best expert 0 is outside
    out = r(x, allowed)
    z = math.exp(1.0) + math.exp(0.5) + math.exp(2.0)
    want = [0.0, math.exp(1.0) / z, math.exp(0.5) / z, math.exp(2.0) / z]
    assert torch.allclose(out.probs_TE[0], torch.tensor(want), atol=1e-7)
    assert out.idx_TK[0].tolist() == [3, 1]
    w3, w1 = want[3] / (want[3] + want[1]), want[1] / (want[3] + want[1])
    assert torch.allclose(out.weight_TK[0], torch.tensor([w3, w1]), atol=1e-7)
    assert r(x).idx_TK[0].tolist() == [0, 3]                       # unmasked: expert 0 wins


def test_sigmoid_bias_cannot_pick_outside_the_group():
    from moedist.moe.router import Router

    r = Router(3, 4, top_k=2, score_func="sigmoid", expert_bias=True, seed=1)
    r.expert_bias.copy_(torch.tensor([100.0, 0, 0, 0]))           # would always choose expert 0
    x = torch.randn(16, 3)
    allowed = torch.tensor([False, True, True, False]).expand(16, 4)
    assert sorted(set(r(x, allowed).idx_TK.flatten().tolist())) == [1, 2]
    assert 0 in r(x).idx_TK.flatten().tolist()


def test_random_group_routing_by_hand():
    from moedist.moe.groups import GroupTable, random_group_routing

    table = GroupTable(6, [[5, 1, 3], []], "random")
    tokens = torch.tensor([0, 7, 200, 7, 7])
    domains = torch.tensor([0, 0, 0, 1, -1])
    idx, w = random_group_routing(tokens, domains, table, 2, layer_seed=4)
    for t, d, got in zip(tokens.tolist(), domains.tolist(), idx.tolist()):
        h = (((t + 1) * 2654435761 + 4 * 40503) % 2**32) >> 16   # the documented hash, in Python ints
        members = [5, 1, 3] if d == 0 else list(range(6))
        j0 = h % len(members)
        assert got == [members[j0], members[(j0 + 1) % len(members)]], (t, d)
    assert torch.equal(w, torch.full((5, 2), 0.5))


def test_config_errors_are_one_line(domains):
    from moedist.config import ConfigError, config_from_dict

    paths, cache = domains
    bad = [({"expert_groups": {"nope": [0, 1]}}, "moe.expert_groups.nope: no data source named 'nope'"),
           ({"expert_groups": {"prose": [0, 8]}}, "expert id 8 is out of range 0..7"),
           ({"expert_groups": {"prose": [1]}}, "1 expert(s) < moe.top_k=2"),
           ({"expert_groups": {"prose": [1, 1]}}, "duplicate expert ids"),
           ({"freeze_experts": [9]}, "moe.freeze_experts=[9]: expert id 9 is out of range"),
           ({"group_routing": "hash"}, "moe.group_routing='hash': must be one of learned|random"),
           ({"router_type": "expert_choice", "capacity_factor": 1.0, "aux_loss_type": "none"},
            "moe.router_type='expert_choice': expert groups and group_routing=random need token_choice")]
    for moe, msg in bad:
        cfg = base_cfg(paths, cache)
        cfg["moe"].update(moe)
        with pytest.raises(ConfigError) as err:
            config_from_dict(cfg)
        assert msg in str(err.value) and "\n" not in str(err.value)
    cfg = base_cfg(paths, cache)
    del cfg["data"]["sources"], cfg["data"]["tokenizer"]
    with pytest.raises(ConfigError, match="needs named data.sources"):
        config_from_dict(cfg)


# ------------------------------------------------------------------ the domain id's path

def test_batches_carry_their_source_index(domains):
    from moedist.config import config_from_dict
    from moedist.data.dataset import build_data

    cfg = config_from_dict(base_cfg(*domains))
    data = build_data(cfg)
    pairs = data.train_pairs(5, 12)
    assert torch.equal(data.train_micro(5, 12).domain_ids, torch.tensor([i for i, _ in pairs]))
    assert {i for i, _ in pairs} == {0, 1}
    assert torch.equal(data.val_micro("code", 1, 3).domain_ids, torch.tensor([1, 1, 1]))


def test_experts_outside_the_group_do_not_change_the_logits(domains):
    """Perturb prose's non-members: prose rows bitwise unchanged, code rows change (code uses expert 4..7)."""
    from moedist.config import config_from_dict
    from moedist.models.build import build_model, moe_layers

    for routing in ("learned", "random"):
        cfg = base_cfg(*domains, group_routing=routing)
        model = build_model(config_from_dict(cfg))
        x = torch.randint(0, 256, (4, 16))
        dom = torch.tensor([0, 1, 0, 1])
        before = model(x, domain_ids=dom).logits
        with torch.no_grad():
            for layer in moe_layers(model):
                for name, p in layer.experts.named_parameters():
                    p[[3, 4, 5, 6, 7]] += 0.5                       # not in prose's group [0, 1, 2]
                layer.router.weight[[3, 4, 5, 6, 7]] += 5.0
        after = model(x, domain_ids=dom).logits
        assert torch.equal(before[[0, 2]], after[[0, 2]]), routing
        assert not torch.allclose(before[[1, 3]], after[[1, 3]]), routing
        assert not torch.equal(model(x).logits[[0, 2]], after[[0, 2]])   # no domain: all experts


# ------------------------------------------------------------------ EP 1 = EP 2 = one process

def _train(rank: int, world: int, jobs: list) -> list:
    from moedist.config import config_from_dict
    from moedist.moe.layer import MoELayer
    from moedist.train.trainer import Trainer

    out = []
    for cfg_dict in jobs:
        trainer = Trainer(config_from_dict(cfg_dict), write_outputs=False, console=False, save_checkpoints=False)
        seen = {"outside": 0, "domains": set()}

        def check(layer, args, result, layer_idx=None):   # every routed token stays in its source's group
            route = args[1]
            names = [s["name"] for s in cfg_dict["data"]["sources"]]
            for d in set(route.domain_T.tolist()):
                seen["domains"].add(d)
            idx = layer.last_idx
            for d, row in zip(route.domain_T.tolist(), idx.tolist()):
                group = GROUPS.get(names[d]) if d >= 0 else None
                seen["outside"] += sum(e not in group for e in row) if group else 0

        for m in trainer.model.modules():
            if isinstance(m, MoELayer):
                m.router.register_forward_hook(lambda mod, a, o, layer=m: setattr(layer, "last_idx", o.idx_TK))
                if cfg_dict["moe"].get("group_routing", "learned") == "learned":
                    m.register_forward_hook(check)
        res = trainer.train()
        out.append({"loss": [r["loss"] for r in res.records], "grad_norm": [r["grad_norm"] for r in res.records],
                    "val": trainer.evaluate_all(), "outside": seen["outside"], "domains": sorted(seen["domains"])})
    return out


def test_groups_equal_at_ep1_ep2_and_one_process(domains):
    jobs = {}
    for routing in ("learned", "random"):
        cfg = base_cfg(*domains, group_routing=routing)
        jobs[routing] = [with_world(cfg, 2, 1), with_world(cfg, 2, 2)]
    flat = jobs["learned"] + jobs["random"]
    got = run_workers(_train, 2, args=(flat,), timeout=400)
    one = run_workers(_train, 1, args=([with_world(base_cfg(*domains, group_routing=k), 1, 1) for k in jobs],))[0]
    ref = dict(zip(jobs, one))
    for i, res in enumerate(got[0]):
        routing = "learned" if i < 2 else "random"
        want = ref[routing]
        for key in ("loss", "grad_norm"):
            for g, w in zip(res[key], want[key]):
                assert abs(g - w) <= 1e-5 * abs(w), (routing, i, key, res[key], want[key])
        for k, w in want["val"].items():
            assert abs(res["val"][k] - w) <= 1e-5 * abs(w), (routing, i, k)
        assert set(want["val"]) == {"val_loss", "val_loss_prose", "val_loss_code"}
    for rank_res in got:
        for res in rank_res[:2]:
            assert res["outside"] == 0 and res["domains"] == [0, 1]
    assert ref["learned"]["outside"] == 0
    assert ref["learned"]["loss"] != ref["random"]["loss"]


def test_activation_checkpointing_recomputes_the_same_groups(domains):
    """The recompute gets the same route (domain and token ids): equal loss and gradients."""
    from moedist.config import config_from_dict
    from moedist.models.act_ckpt import apply_activation_checkpointing
    from moedist.models.build import build_model
    from moedist.train.rng import model_generators

    x = torch.randint(0, 256, (4, 16))
    dom = torch.tensor([0, 1, 1, 0])
    for routing in ("learned", "random"):
        grads = {}
        for mode in ("none", "moe", "full"):
            model = build_model(config_from_dict(base_cfg(*domains, group_routing=routing)))
            apply_activation_checkpointing(model, mode, model_generators)
            out = model(x, x, domain_ids=dom)
            out.loss.backward()
            grads[mode] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        for mode in ("moe", "full"):
            assert torch.equal(grads[mode][0], grads["none"][0]), (routing, mode)
            for n, g in grads["none"][1].items():
                assert torch.allclose(grads[mode][1][n], g, atol=1e-6, rtol=1e-5), (routing, mode, n)


@pytest.mark.slow
def test_groups_equal_at_ep4(domains):
    """World 4: EP 1, 2 and 4 (two experts per rank) against one process, learned and random routing."""
    cfgs = {k: base_cfg(*domains, group_routing=k) for k in ("learned", "random")}
    jobs = [with_world(cfgs[k], 4, ep) for k in cfgs for ep in (1, 2, 4)]
    got = run_workers(_train, 4, args=(jobs,), timeout=600)[0]
    ref = dict(zip(cfgs, run_workers(_train, 1, args=([with_world(c, 1, 1) for c in cfgs.values()],))[0]))
    for i, res in enumerate(got):
        want = ref["learned" if i < 3 else "random"]
        for key in ("loss", "grad_norm"):
            assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(res[key], want[key])), (i, key)
        assert all(abs(res["val"][k] - w) <= 1e-5 * abs(w) for k, w in want["val"].items()), i
        assert res["outside"] == 0
