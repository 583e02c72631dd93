"""Architecture facts are typed config keys (issue 15 item 5): model.head_dim, attention_bias, qk_norm,
mlp_only_layers, rope_scaling, hf_model_type and moe.shared_expert_ffn_size round-trip through
save_config, are set by the Hugging Face import, land in `convert` and `train` outputs, and checkpoints
of the old format (the facts in extra_state["moedist.arch"]) still load."""
import ast
import dataclasses
import json
import pathlib

import pytest
import torch
import yaml

from moedist.cli import main
from moedist.config import ConfigError, config_to_dict, load_config, save_config
from tests.test_hf_import import hf_logits, make_hf, our_logits, token_ids

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
SMALL = ["train.max_steps=1", "train.warmup_steps=0", "train.eval_batches=1", "train.plot=false",
         "train.micro_batch_size=2", "data.seq_len=16", "model.max_seq_len=16"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
ARCH = ["model.head_dim=16", "model.attention_bias=true", "model.qk_norm=true", "model.num_layers=3",
        "model.mlp_only_layers=[1]", f"model.rope_scaling={json.dumps(LLAMA3)}", "model.hf_model_type=qwen3_moe",
        "moe.num_shared_experts=1", "moe.shared_expert_gate=true", "moe.shared_expert_ffn_size=40"]


def test_typed_arch_keys_round_trip_through_save_config(tmp_path):
    cfg = load_config(None, ARCH)
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["model"]["hf_model_type"] == "qwen3_moe" and raw["model"]["head_dim"] == 16
    assert raw["model"]["mlp_only_layers"] == [1] and raw["model"]["rope_scaling"] == LLAMA3
    assert raw["moe"]["shared_expert_ffn_size"] == 40 and raw["model"]["qk_norm"] is True
    back = load_config(tmp_path / "config.yaml")
    assert back == cfg and config_to_dict(back) == config_to_dict(cfg)
    m = load_config(None).model            # defaults keep the Llama-style model of before
    assert (m.head_dim, m.attention_bias, m.qk_norm, m.mlp_only_layers, m.rope_scaling, m.hf_model_type) == \
        (None, False, False, [], None, None)


def test_typed_keys_build_the_model_they_describe():
    from moedist.models import build_model, moe_layers

    model = build_model(load_config(None, ARCH + ["model.vocab_size=256"]))
    attn = model.layers[0].self_attn
    assert attn.d == 16 and attn.q_norm is not None and attn.q_proj.bias is not None
    assert [i for i, layer in enumerate(model.layers) if layer.mlp in moe_layers(model)] == [0, 2]
    assert model.layers[0].mlp.shared_experts.w_up.shape == (64, 40) and model.rope_scaling == LLAMA3


@pytest.mark.parametrize("override,start", [
    ("model.hf_model_type=gpt2", "model.hf_model_type='gpt2': must be one of llama|mistral|qwen2|qwen3|mixtral|"),
    ("model.mlp_only_layers=[0,2]", "model.mlp_only_layers=[0, 2]: each must be a layer index 0 .. 1"),
    ("model.rope_scaling={rope_type: yarn, factor: 2}", "model.rope_scaling.rope_type='yarn': must be one of "
                                                        "linear|llama3"),
    ("model.rope_scaling={rope_type: linear}", "model.rope_scaling.factor=null: must be a number > 0"),
    ("model.rope_scaling={rope_type: linear, factor: 2, beta: 1}", "model.rope_scaling.beta: unknown key"),
    ("model.rope_scaling={rope_type: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 1, "
     "original_max_position_embeddings: 8}", "model.rope_scaling.high_freq_factor=1: must be > low_freq_factor"),
])
def test_bad_arch_values_are_one_line_exit_2(override, start, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(start)
    assert main(["train", TINY, override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and start in lines[0]


# what each architecture's tiny model (tests.test_hf_import.make_hf) must give, written out by hand
EXPECTED = {
    "llama": dict(hf_model_type="llama", head_dim=8, attention_bias=False, qk_norm=False, mlp_only_layers=[],
                  moe_every=0),
    "mixtral": dict(hf_model_type="mixtral", head_dim=8, attention_bias=False, qk_norm=False, mlp_only_layers=[],
                    moe_every=1),
    "qwen3_moe": dict(hf_model_type="qwen3_moe", head_dim=16, attention_bias=False, qk_norm=True,
                      mlp_only_layers=[1], moe_every=1),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_hf_import_sets_the_typed_keys(arch):
    from moedist.models.hf_maps import hf_to_moedist_config, read_hf_config

    cfg = hf_to_moedist_config(read_hf_config(make_hf(arch)))
    got = {k: getattr(cfg.model, k) for k in EXPECTED[arch]}
    assert got == EXPECTED[arch] and cfg.model.rope_scaling is None and cfg.moe.shared_expert_ffn_size is None
    with pytest.raises(ValueError, match="model.hf_model_type: fixed by the Hugging Face checkpoint"):
        hf_to_moedist_config(read_hf_config(make_hf(arch)), model={"hf_model_type": "llama"})


def test_convert_and_train_outputs_carry_the_typed_keys(tmp_path, capsys):
    make_hf("qwen3_moe", vocab=256).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "md")]) == 0
    assert "wrote moedist model (qwen3_moe," in capsys.readouterr().out
    manifest = json.loads((tmp_path / "md" / "manifest.json").read_text())
    model = manifest["config"]["model"]
    assert {k: model[k] for k in EXPECTED["qwen3_moe"]} == EXPECTED["qwen3_moe"]
    assert "moedist.arch" not in manifest["extra_state"]            # no second copy beside the config
    for source in (f"model.init_from={tmp_path / 'md'}", f"model.from_hf={tmp_path / 'hf'}"):
        out = tmp_path / ("run_" + source.split("=")[0].split(".")[1])
        assert main(["train", TINY, source, f"train.output_dir={out}", "lora.mode=none", *SMALL]) == 0
        saved = load_config(out / "config.yaml").model
        assert {k: getattr(saved, k) for k in EXPECTED["qwen3_moe"]} == EXPECTED["qwen3_moe"]


def _old_format(ckpt: pathlib.Path) -> dict:
    """Rewrite a checkpoint's manifest as moedist wrote it before the keys existed: config without
    them, the architecture facts in extra_state["moedist.arch"]."""
    path = ckpt / "manifest.json"
    m = json.loads(path.read_text())
    model, moe = m["config"]["model"], m["config"]["moe"]
    legacy = {"model": {k: model.pop(k) for k in ("head_dim", "attention_bias", "qk_norm", "mlp_only_layers",
                                                  "rope_scaling")},
              "moe": {"shared_expert_ffn_size": moe.pop("shared_expert_ffn_size")}}
    model.pop("hf_model_type")
    m["extra_state"]["moedist.arch"] = legacy
    path.write_text(json.dumps(m))
    return legacy


def test_old_format_checkpoint_still_loads(tmp_path):
    from moedist.checkpoint import read_manifest
    from moedist.models.convert_cli import load_model_checkpoint
    from moedist.train.init_from import apply_init_from

    hf = make_hf("qwen3_moe", vocab=256)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "old")]) == 0
    legacy = _old_format(tmp_path / "old")
    assert legacy["model"]["head_dim"] == 16 and legacy["model"]["mlp_only_layers"] == [1]
    m = read_manifest(tmp_path / "old")
    assert m["config"]["model"]["head_dim"] == 16 and "moedist.arch" not in m["extra_state"]
    model, cfg = load_model_checkpoint(str(tmp_path / "old"))
    assert (cfg.model.head_dim, cfg.model.qk_norm, cfg.model.mlp_only_layers) == (16, True, [1])
    ids = token_ids(3, vocab=256)
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    run = apply_init_from(load_config(TINY, [f"model.init_from={tmp_path / 'old'}"]))
    assert (run.model.head_dim, run.model.qk_norm, run.model.mlp_only_layers) == (16, True, [1])
    assert main(["convert", "to-hf", str(tmp_path / "old"), str(tmp_path / "back")]) == 0   # the CLI path too


def test_legacy_facts_fill_only_missing_keys():
    from moedist.checkpoint.io import upgrade_legacy_arch

    m = {"config": {"model": {"head_dim": 32}}, "extra_state": {"moedist.arch": {
        "model": {"head_dim": 16, "qk_norm": True}, "moe": {"shared_expert_ffn_size": 40}}, "source": "x"}}
    assert upgrade_legacy_arch(m) == {"config": {"model": {"head_dim": 32, "qk_norm": True},
                                                 "moe": {"shared_expert_ffn_size": 40}},
                                      "extra_state": {"source": "x"}}


SCOPE = ["moedist/models", "moedist/config.py", "moedist/config_rules.py", "moedist/choices.py",
         "moedist/train/init_from.py", "moedist/checkpoint/grow.py"]
ALLOWED = {("moedist/models/hf_maps.py", "read_hf_config"),   # a transformers model passed in memory
           ("moedist/models/parallelize.py", "shard_experts_")}  # a parameter's expert tag, not a part


def test_no_getattr_default_or_hasattr_dispatch_left():
    found = []

    class Calls(ast.NodeVisitor):
        def __init__(self, rel):
            self.rel, self.where = rel, [None]

        def visit_FunctionDef(self, node):
            self.where.append(node.name)
            self.generic_visit(node)
            self.where.pop()

        def visit_Call(self, node):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if (name in ("hasattr", "vars") or (name == "getattr" and len(node.args) == 3)) and \
                    (self.rel, self.where[-1]) not in ALLOWED:
                found.append(f"{self.rel}:{node.lineno} {ast.unparse(node)}")
            self.generic_visit(node)

    for s in SCOPE:
        for path in sorted((ROOT / s).rglob("*.py")) if (ROOT / s).is_dir() else [ROOT / s]:
            rel = str(path.relative_to(ROOT))
            Calls(rel).visit(ast.parse(path.read_text()))
    assert not found, found


def test_builders_take_typed_sections():
    import inspect

    from moedist.config import LoRAConfig, ModelConfig, MoEConfig, MoedistConfig
    from moedist.models import build

    sig = inspect.signature(build.build_moe_layer, eval_str=True).parameters
    assert [sig[k].annotation for k in ("model_cfg", "moe_cfg", "lora_cfg")] == [ModelConfig, MoEConfig, LoRAConfig]
    assert inspect.signature(build.build_model, eval_str=True).parameters["cfg"].annotation is MoedistConfig
    for fn in (build.apply_param_dtype, build.apply_expert_groups, build.apply_lora_freezing):
        params = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        assert all(dataclasses.is_dataclass(p.annotation) for p in params), fn.__name__


# part keyword -> the config key build_moe_layer passes for it
PART_KEYS = {
    "MoELayer": {"capacity_factor": "moe.capacity_factor", "min_capacity": "moe.min_capacity",
                 "drop_policy": "moe.drop_policy", "aux_loss_type": "moe.aux_loss_type",
                 "aux_loss_coef": "moe.aux_loss_coef", "z_loss_coef": "moe.z_loss_coef",
                 "eval_capacity_factor": "moe.eval_capacity_factor", "router_type": "moe.router_type"},
    "Router": {"score_func": "moe.score_func", "renormalize": "moe.renormalize", "noisy_gating": "moe.noisy_gating",
               "jitter_eps": "moe.jitter_eps", "expert_bias": "moe.expert_bias", "init_std": "model.init_std",
               "second_expert_policy": "moe.second_expert_policy"},
    "SharedExperts": {"activation": "moe.activation", "gated": "moe.shared_expert_gate", "init_std": "model.init_std"},
    "GroupedExperts": {"activation": "moe.activation", "init_std": "model.init_std"},
    "LoRAOnExperts": {"lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "targets": "lora.targets"},
    "MoELoRAExperts": {"lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "targets": "lora.targets",
                       "activation": "moe.activation", "init_std": "model.init_std"},
}


def test_part_defaults_agree_with_the_config_or_are_documented():
    """The only keyword defaults of the parts that differ from the config's are the three MoELayer documents."""
    import inspect

    from moedist import moe
    from moedist.config import config_schema

    defaults = {info.key: info.default for info in config_schema()}
    differ = []
    for cls_name, keys in PART_KEYS.items():
        params = inspect.signature(getattr(moe, cls_name).__init__).parameters
        for kw, key in keys.items():
            if kw not in params:
                continue
            part, config = params[kw].default, defaults[key]
            if (list(part) if isinstance(part, tuple) else part) != config:
                differ.append(f"{cls_name}.{kw}")
                assert f"`{key}`" in moe.MoELayer.__doc__, f"{cls_name}.{kw}={part!r} vs {key}={config!r}: undocumented"
    assert sorted(differ) == ["MoELayer.aux_loss_coef", "MoELayer.drop_policy", "MoELayer.min_capacity"]


def test_more_parts_take_their_choices_from_moedist_choices():
    import importlib
    import inspect

    from moedist import choices as C
    from moedist.layers import dense_lora
    from moedist.models import convert_cli, hf_maps, lora

    upcycle = importlib.import_module("moedist.models.upcycle")   # moedist.models.upcycle is also a function
    from moedist.moe import LoRAOnExperts, MoELoRAExperts

    assert hf_maps.SUPPORTED is C.HF_MODEL_TYPES and hf_maps.MOE_TYPES is C.HF_MOE_TYPES
    assert hf_maps.ROPE_TYPES is C.ROPE_TYPES and set(C.ROPE_SCALING_TYPES) < set(C.ROPE_TYPES)
    assert upcycle.METHODS is C.UPCYCLE_METHODS and dense_lora.LORA_TARGETS is C.DENSE_LORA_TARGETS
    upcycle_action = convert_cli._parser()._subparsers._group_actions[0].choices["upcycle"]
    assert next(a for a in upcycle_action._actions if a.dest == "method").choices is C.UPCYCLE_METHODS
    for cls in (LoRAOnExperts, MoELoRAExperts, lora.LoRAFFN):
        assert inspect.signature(cls.__init__).parameters["targets"].default is C.LORA_TARGETS, cls.__name__
