"""model.dtype=bfloat16 (issue 11 item 3): the frozen base is stored and run in bf16, trainable
parameters keep fp32 master weights and optimizer state, routers compute in fp32.

Checked in 2 gloo processes at EP=2 against the same run in fp32 (the reference): the first
losses agree within 0.05; frozen weights are bf16 and bitwise equal, after training, to an
independent fresh fp32 build rounded to bf16; adapters/routers and their AdamW state are fp32;
the final checkpoint holds fp32 trainable tensors and bf16 frozen ones. Under DeepSpeed it
composes with deepspeed.bf16 (ZeRO-2). Bad combinations are refused at preflight with one line.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests._dist import run_workers

BASE = {
    "name": "bf16",
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_size": 48,
              "max_seq_len": 32},
    "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": None, "num_shared_experts": 1},
    "lora": {"mode": "moe_lora", "rank": 4, "alpha": 8.0, "train_router": True},
    "train": {"max_steps": 4, "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1, "grad_clip": 1.0,
              "micro_batch_size": 2, "grad_accum": 1, "seed": 3, "eval_batches": 1, "log_every": 100,
              "plot": False},
    "data": {"source": "stdlib", "seq_len": 32},
    "parallel": {"ep_size": 2},
}


def _cfg(mode: str, dtype: str, out: str, ds_bf16: bool = False) -> dict:
    c = copy.deepcopy(BASE)
    c["lora"]["mode"] = mode
    c["model"]["dtype"] = dtype
    c["train"]["output_dir"] = out
    if ds_bf16:
        c["deepspeed"] = {"enabled": True, "zero_stage": 2, "bf16": True}
    return c


def _run(rank, world, cases):
    from moedist.config import config_from_dict
    from moedist.models import build_model, parallelize
    from moedist.train.trainer import Trainer
    import types

    out = {}
    for name, d in cases:
        cfg = config_from_dict(d)
        t = Trainer(cfg, console=False)
        res = t.train()
        model = t.runner.module
        fresh = parallelize(build_model(config_from_dict({**d, "model": {**d["model"], "dtype": "float32"}})),
                            types.SimpleNamespace(size=2, rank=rank))
        ref = dict(fresh.named_parameters())
        info = {"losses": [r["loss"] for r in res.records], "frozen_ok": [], "dtypes": {}}
        for n, p in model.named_parameters():
            info["dtypes"][n] = (str(p.dtype), p.requires_grad)
            if not p.requires_grad:
                want = ref[n].detach().to(p.dtype)
                info["frozen_ok"].append((n, torch.equal(p.detach().cpu(), want)))
        if t.runner.kind == "pytorch":
            info["opt_dtypes"] = sorted({str(v.dtype) for s in t.runner.optimizer.state.values()
                                         for k, v in s.items() if torch.is_tensor(v) and k != "step"})
        out[name] = info
    return out


def test_bf16_lora_moe_matches_fp32_and_keeps_the_base_frozen(tmp_path):
    cases = [(f"{mode} {dt}", _cfg(mode, dt, str(tmp_path / f"{mode}_{dt}")))
             for mode in ("moe_lora", "expert_lora") for dt in ("float32", "bfloat16")]
    cases.append(("moe_lora bfloat16 ds", _cfg("moe_lora", "bfloat16", str(tmp_path / "ds"), ds_bf16=True)))
    results = run_workers(_run, 2, args=(cases,), timeout=600)
    for rank, res in enumerate(results):
        for mode in ("moe_lora", "expert_lora"):
            f32, b16 = res[f"{mode} float32"], res[f"{mode} bfloat16"]
            diffs = [abs(a - b) for a, b in zip(f32["losses"], b16["losses"])]
            assert len(diffs) == 4 and max(diffs) < 0.05, (mode, f32["losses"], b16["losses"])
            print(mode, "fp32", [round(x, 4) for x in f32["losses"]], "bf16", [round(x, 4) for x in b16["losses"]])
            assert f32["losses"][0] != b16["losses"][0]  # the bf16 run really ran in bf16
            frozen = [n for n, (dt, rg) in b16["dtypes"].items() if not rg and ".router." not in n]
            assert frozen and all(b16["dtypes"][n][0] == "torch.bfloat16" for n in frozen), b16["dtypes"]
            trainable = [n for n, (dt, rg) in b16["dtypes"].items() if rg]
            assert any("lora_A" in n for n in trainable) and any(".router." in n for n in trainable)
            assert all(b16["dtypes"][n][0] == "torch.float32" for n in trainable)
            assert all(ok for _, ok in b16["frozen_ok"]), [n for n, ok in b16["frozen_ok"] if not ok]
            assert b16["opt_dtypes"] == ["torch.float32"]
        ds = res["moe_lora bfloat16 ds"]
        ref = res["moe_lora float32"]["losses"]
        assert max(abs(a - b) for a, b in zip(ref, ds["losses"])) < 0.05, (ref, ds["losses"])
        assert all(ok for _, ok in ds["frozen_ok"])
    # the final checkpoint: trainable tensors fp32 (masters), frozen ones bf16
    from safetensors import safe_open

    for sub in ("moe_lora_bfloat16", "expert_lora_bfloat16"):
        folder = tmp_path / sub / "final"
        kinds = {}
        for f in folder.glob("model-*.safetensors"):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    kinds[k] = h.get_tensor(k).dtype
        assert kinds[next(k for k in kinds if "lora_A" in k)] == torch.float32
        assert kinds[next(k for k in kinds if ".router." in k)] == torch.float32
        assert kinds["embed_tokens.weight"] == torch.bfloat16
        assert kinds[next(k for k in kinds if k.endswith("w_up") and "lora" not in k)] == torch.bfloat16


@pytest.mark.parametrize("extra, message", [
    ({"model": {"dtype": "bfloat16"}, "lora": {"mode": "none"}}, "model.dtype='bfloat16' with lora.mode=none"),
    ({"model": {"dtype": "float16"}}, "model.dtype='float16': not supported"),
])
def test_preflight_refuses_bad_dtype_combinations(tmp_path, extra, message):
    from moedist.config import ConfigError, config_from_dict
    from moedist.train.preflight import preflight

    d = _cfg("moe_lora", "float32", str(tmp_path / "o"))
    d["parallel"] = {"ep_size": 1}
    for sec, vals in extra.items():
        d[sec].update(vals)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        preflight(config_from_dict(d), 1)


def test_bf16_lora_forward_on_cpu_every_mode():
    """Every LoRA mode runs forward + backward with a bf16 base; gradients reach only fp32 adapters."""
    from moedist.config import load_config
    from moedist.models import build_local_model

    for mode in ("moe_lora", "expert_lora", "full"):
        cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.ffn_size=48", "model.num_heads=4",
                                 "moe.num_experts=4", "model.vocab_size=256", f"lora.mode={mode}",
                                 "model.dtype=bfloat16", "lora.train_router=true"])
        model = build_local_model(cfg)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        out = model(ids, ids)
        assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
        out.loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
            else:
                assert p.grad is None and p.dtype == torch.bfloat16, n
