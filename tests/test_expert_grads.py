"""Expert weight gradients kept between steps (issue 18.2): the PyTorch runner marks the stacked
[L, H, F] gradients stale instead of freeing them and the fused kernel writes (first micro-batch)
or adds (later ones) into them, so no step after the first allocates them again. Reference: the plain single-process loop of test_train_equivalence
(autograd gradients, `zero_grad(set_to_none=True)`), whose losses and norms must come out again."""
from __future__ import annotations

import pytest
import torch

from moedist.moe.experts import keeps_expert_grads
from tests._dist import run_workers
from tests.test_train_equivalence import STEPS, assert_close, make_cfg, reference_run


def _train_and_watch(rank: int, world: int, cfg_dict: dict) -> dict:
    from moedist.config import config_from_dict
    from moedist.moe.experts import GroupedExperts
    from moedist.train.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict), write_outputs=False, console=False, save_checkpoints=False)
    experts = [m for m in trainer.model.modules() if isinstance(m, GroupedExperts)]
    weights = [w for m in experts for w in (m.w_gate, m.w_up, m.w_down) if w is not None]
    ptrs = []  # the expert gradients' storage at every optimizer step
    trainer.runner.optimizer.register_step_post_hook(
        lambda opt, args, kwargs: ptrs.append([w.grad.data_ptr() for w in weights]))
    res = trainer.train()
    return {"loss": [r["loss"] for r in res.records], "grad_norm": [r["grad_norm"] for r in res.records],
            "ptrs": ptrs, "in_place": [m.grad_in_place for m in experts],
            "stale": all(m.kept_grads.stale for m in experts) and all(w.grad is not None for w in weights)}


def test_pytorch_runner_reuses_expert_gradients_with_unchanged_numbers():
    cfg = make_cfg(2, 2)  # 2 gloo processes, EP=2, grad_accum 2 (gradients added across micro-batches)
    ref = reference_run(make_cfg(1))
    for r in run_workers(_train_and_watch, 2, args=(cfg,)):
        assert r["in_place"] and all(r["in_place"])
        assert len(r["ptrs"]) == STEPS and all(p == r["ptrs"][0] for p in r["ptrs"]), "expert gradients reallocated"
        assert r["stale"]  # kept and marked stale after the last step, not freed
        assert_close(r["loss"], ref["loss"], "loss")
        assert_close(r["grad_norm"], ref["grad_norm"], "grad_norm")


def test_frozen_experts_get_their_gradient_hooks_back():
    """moe.freeze_experts zeroes frozen slices in a gradient hook, which in-place gradients would skip:
    FrozenExperts hands those experts back to autograd, and their frozen rows' gradients are exact zeros
    (the global norm, clipping and Adam's moments must not see them)."""
    import torch

    from moedist.config import config_from_dict
    from moedist.models import build_model
    from moedist.moe.experts import GroupedExperts, keep_expert_grads
    from moedist.train.freeze import FrozenExperts

    model = build_model(config_from_dict(make_cfg(1)))
    kept = keep_expert_grads(model)
    kept_ids = {id(p) for p in kept}
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def backward():
        for p in model.parameters():
            if p.grad is not None and id(p) not in kept_ids:
                p.grad = None
        for p in kept:
            if p.grad is not None:
                p.grad.zero_()
        model(x, x).loss.backward()

    backward()  # first step: the kept gradients are allocated
    frozen = FrozenExperts.from_model(model, [0, 3])
    backward()
    experts = [s for s in frozen.slices if "router" not in s.name]
    assert experts
    for s in experts:
        assert s.param.grad is not None and torch.equal(s.param.grad[s.index], torch.zeros_like(s.param.grad[s.index]))
        assert s.param.grad.abs().sum() > 0
    assert not any(m.grad_in_place for m in model.modules() if isinstance(m, GroupedExperts))


def _train_frozen(rank: int, world: int, cfg_dict: dict) -> dict:
    from moedist.config import config_from_dict
    from moedist.moe.experts import GroupedExperts
    from moedist.train.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict), write_outputs=False, console=False, save_checkpoints=False)
    res = trainer.train()
    ws = [w.detach().clone() for m in trainer.model.modules() if isinstance(m, GroupedExperts)
          for w in (m.w_gate, m.w_up, m.w_down) if w is not None]
    return {"loss": [r["loss"] for r in res.records], "grad_norm": [r["grad_norm"] for r in res.records],
            "weights": ws}


def test_frozen_experts_train_as_with_autograd_gradients():
    """moe.freeze_experts under the PyTorch runner: the experts handed back to autograd must have
    their gradients freed between steps like any other (kept, they would add up over steps).
    Reference: the same run with no kept gradients at all (train.expert_grads=fresh: autograd
    allocates every gradient every step), whose losses, norms and final expert weights must come out again."""
    import torch

    got, ref = (run_workers(_train_frozen, 1, args=(make_cfg(1, extra={"moe": {"freeze_experts": [0, 3]},
                                                                     "train": {"expert_grads": mode}}),))[0]
                for mode in ("kept", "fresh"))
    assert_close(got["loss"], ref["loss"], "loss")
    assert_close(got["grad_norm"], ref["grad_norm"], "grad_norm")
    assert len(got["weights"]) == len(ref["weights"]) > 0
    for a, b in zip(got["weights"], ref["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, device, kept", [("auto", "cpu", True), ("auto", "cuda", False), ("kept", "cpu", True),
                                                ("kept", "cuda", True), ("fresh", "cpu", False), ("fresh", "cuda", False)])
def test_expert_grads_mode_resolves_per_device(mode, device, kept):
    assert keeps_expert_grads(mode, torch.device(device)) is kept


def test_expert_grads_mode_rejects_unknown_value():
    with pytest.raises(ValueError, match=r"train.expert_grads='always': allowed auto, kept, fresh"):
        keeps_expert_grads("always", torch.device("cpu"))


def _train_fresh(rank: int, world: int, cfg_dict: dict) -> dict:
    from moedist.config import config_from_dict
    from moedist.moe.experts import GroupedExperts
    from moedist.train.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict), write_outputs=False, console=False, save_checkpoints=False)
    experts = [m for m in trainer.model.modules() if isinstance(m, GroupedExperts)]
    weights = [w for m in experts for w in (m.w_gate, m.w_up, m.w_down) if w is not None]
    had = []  # whether each expert weight had a gradient when the optimizer stepped
    trainer.runner.optimizer.register_step_post_hook(lambda opt, args, kwargs: had.append([w.grad is not None for w in weights]))
    res = trainer.train()
    return {"loss": [r["loss"] for r in res.records], "grad_norm": [r["grad_norm"] for r in res.records],
            "had": had, "in_place": [m.grad_in_place for m in experts],
            "freed": all(w.grad is None for w in weights)}


def test_fresh_expert_grads_are_freed_between_steps_with_unchanged_numbers():
    """train.expert_grads=fresh (what 'auto' picks on a GPU): no kept gradients, every expert gradient
    freed after the optimizer step as autograd does (the lowest peak memory), at EP=2 with gradient
    accumulation; the losses and norms of the plain single-process reference come out again."""
    cfg = make_cfg(2, 2, extra={"train": {"expert_grads": "fresh"}})
    ref = reference_run(make_cfg(1))
    for r in run_workers(_train_fresh, 2, args=(cfg,)):
        assert r["in_place"] and not any(r["in_place"])
        assert len(r["had"]) == STEPS and all(all(h) for h in r["had"])
        assert r["freed"], "expert gradients kept after the last step"
        assert_close(r["loss"], ref["loss"], "loss")
        assert_close(r["grad_norm"], ref["grad_norm"], "grad_norm")
