"""moedist.config: key names, YAML round trip, overrides, validation rules, docs in sync."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moedist import cli
from moedist.config import (ConfigError, MoedistConfig, config_from_dict, config_keys, config_schema,
                            config_to_dict, load_config, save_config, validate, validate_world_size)

ROOT = Path(__file__).resolve().parents[1]

# The key names other code and the acceptance tests rely on (from the task statement).
REQUIRED_KEYS = {
    "model": "vocab_size hidden_size num_layers num_heads num_kv_heads ffn_size max_seq_len rope_theta "
             "norm_eps moe_every tie_embeddings from_hf init_from dtype init_std",
    "moe": "num_experts top_k capacity_factor min_capacity num_shared_experts shared_expert_gate drop_policy "
           "aux_loss_type aux_loss_coef z_loss_coef score_func renormalize noisy_gating jitter_eps "
           "expert_bias expert_ffn_size activation",
    "lora": "rank alpha dropout mode targets train_router train_shared_experts",
    "parallel": "ep_size timeout_s",
    "train": "max_steps lr min_lr warmup_steps lr_schedule weight_decay adam_betas grad_clip seed output_dir "
             "micro_batch_size grad_accum save_every log_every eval_every eval_batches resume tensorboard "
             "plot optimizer save_on_interrupt keep_last nonfinite activation_checkpointing",
    "data": "source path seq_len val_fraction seed tokenizer sources pack cache_dir",
    "deepspeed": "enabled zero_stage bf16 fp16 offload_optimizer offload_param extra",
}


def test_required_key_names_exist():
    keys = set(config_keys())
    missing = [f"{s}.{k}" for s, names in REQUIRED_KEYS.items() for k in names.split() if f"{s}.{k}" not in keys]
    assert missing == []
    assert "name" in keys


def test_every_key_has_help():
    for info in config_schema():
        assert info.help and info.help[0].isupper() and info.help.endswith((".", ")")), info.key


def test_choices_match_task_statement():
    allowed = {info.key: info.allowed for info in config_schema()}
    assert allowed["model.dtype"] == "one of float32|bfloat16|float16"
    assert allowed["moe.drop_policy"] == "one of position|probs"
    assert allowed["moe.aux_loss_type"] == "one of switch|importance|none"
    assert allowed["moe.score_func"] == "one of softmax|sigmoid"
    assert allowed["moe.activation"] == "one of swiglu|gelu|relu"
    assert allowed["lora.mode"] == "one of none|moe_lora|expert_lora|full"
    assert allowed["lora.targets"] == "one of gate|up|down"
    assert allowed["train.lr_schedule"] == "one of cosine|constant|linear"
    assert allowed["train.optimizer"] == "one of adamw|sgd"
    assert allowed["data.source"] == "one of pydoc|stdlib|file"
    assert allowed["deepspeed.zero_stage"] == "one of 0|1|2|3"


def test_defaults_are_valid_and_independent():
    a, b = MoedistConfig(), MoedistConfig()
    validate(a)
    a.lora.targets.append("gate")
    a.deepspeed.extra["x"] = 1
    assert b.lora.targets == ["gate", "up", "down"] and b.deepspeed.extra == {}
    assert load_config(None, []) == MoedistConfig()


def test_shipped_configs():
    tiny = load_config(ROOT / "configs/tiny.yaml", [])
    assert (tiny.model.vocab_size, tiny.model.hidden_size, tiny.model.num_layers, tiny.model.num_heads) == (256, 64, 2, 4)
    assert (tiny.moe.num_experts, tiny.moe.top_k, tiny.moe.capacity_factor) == (8, 2, 1.25)
    assert (tiny.data.seq_len, tiny.train.micro_batch_size, tiny.train.max_steps) == (64, 4, 5)
    assert tiny.train.lr == 1e-3 and tiny.train.output_dir == "runs/tiny" and tiny.data.source == "pydoc"
    demo = load_config(ROOT / "configs/demo.yaml", [])
    assert (demo.lora.mode, demo.lora.rank, demo.parallel.ep_size) == ("moe_lora", 8, 2)
    assert demo.deepspeed.enabled and demo.deepspeed.zero_stage == 2 and demo.data.source == "stdlib"


# ------------------------------------------------------------------ round trip

def test_round_trip_save_load(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [
        "name=yes", "train.output_dir=2024-01-01", "data.cache_dir='1e-3'", "moe.capacity_factor=0.5",
        "deepspeed.extra={zero_optimization: {reduce_bucket_size: 500000}, wall_clock_breakdown: true}",
        "train.adam_betas=[0.8, 0.99]", "lora.targets=[down]"])
    assert cfg.name == "yes" and cfg.train.output_dir == "2024-01-01" and cfg.data.cache_dir == "1e-3"
    assert cfg.train.adam_betas == (0.8, 0.99)
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    again = load_config(path, [])
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]      # no temp file left
    text = path.read_text()
    assert "name: 'yes'" in text and "targets: [down]" in text


def test_config_to_dict_is_plain_yaml():
    d = config_to_dict(load_config(ROOT / "configs/tiny.yaml", []))
    assert d["train"]["adam_betas"] == [0.9, 0.95] and d["moe"]["top_k"] == 2
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert set(d) == {f.name for f in dataclasses.fields(MoedistConfig)}


def test_print_config_output_loads_back(tmp_path, capsys):
    assert cli.main(["train", str(ROOT / "configs/tiny.yaml"), "moe.top_k=1", "--print-config"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(out)
    assert load_config(tmp_path / "c.yaml", []) == load_config(ROOT / "configs/tiny.yaml", ["moe.top_k=1"])


# ------------------------------------------------------------------- overrides

def test_overrides_nested_null_lists_dicts():
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "moe.capacity_factor=null", "lora.targets=[gate,up]", "model.num_layers=4", "train.lr=2e-4",
        "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0",
        "deepspeed.extra.gradient_clipping=0.5", "name=my run", "moe.expert_ffn_size=32"])
    assert cfg.moe.capacity_factor is None
    assert cfg.lora.targets == ["gate", "up"]
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 64      # rest of the file kept
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.deepspeed.extra == {"zero_optimization": {"stage3_param_persistence_threshold": 0},
                                   "gradient_clipping": 0.5}
    assert cfg.name == "my run" and cfg.moe.expert_ffn_size == 32


def test_override_order_whole_section_and_int_for_float():
    cfg = load_config(None, ["moe.top_k=1", "moe.top_k=3", "train.lr=1", "moe={num_experts: 4, top_k: 1}"])
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 1
    assert cfg.moe.capacity_factor is None            # whole section replaced: defaults for the rest
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_override_value_is_yaml_1_2():
    cfg = load_config(None, ["train.output_dir='010'", "train.seed=010", "name=on", "train.min_lr=1e-6"])
    assert cfg.train.output_dir == "010"
    assert cfg.train.seed == 10                       # decimal, not YAML 1.1 octal
    assert cfg.name == "on"                           # YAML 1.1 would make this a bool
    assert cfg.train.min_lr == 1e-6                   # YAML 1.1 would make this a string


def test_yaml_1_2_scalars_in_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: off\ntrain:\n  lr: 1e-3\n  min_lr: 0\n  tensorboard: True\n")
    cfg = load_config(p, [])
    assert cfg.name == "off" and cfg.train.lr == 1e-3 and cfg.train.min_lr == 0.0 and cfg.train.tensorboard


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    (tmp_path / "sec.yaml").write_text("moe:\ntrain: {}\n")
    assert load_config(tmp_path / "empty.yaml", []) == MoedistConfig()
    assert load_config(tmp_path / "sec.yaml", []) == MoedistConfig()


def test_config_from_dict_and_validate_programmatic():
    cfg = config_from_dict({"moe": {"top_k": 1}, "train": {"adam_betas": [0.9, 0.9]}})
    assert cfg.moe.top_k == 1 and cfg.train.adam_betas == (0.9, 0.9)
    cfg.moe.top_k = 20
    with pytest.raises(ConfigError, match=r"^moe\.top_k=20: must be <= moe\.num_experts \(8\)$"):
        validate(cfg)
    cfg.moe.top_k = "2"
    with pytest.raises(ConfigError, match=r"^moe\.top_k='2': must be an integer$"):
        validate(cfg)


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("overrides, message", [
    (["moe.top_k=9"], "moe.top_k=9: must be <= moe.num_experts (8)"),
    (["moe.topk=2"], "moe.topk: unknown key, did you mean moe.top_k?"),
    (["moe.ep_size=2"], "moe.ep_size: unknown key, did you mean parallel.ep_size?"),
    (["modle.hidden_size=8"], "modle.hidden_size: unknown key, did you mean model.hidden_size?"),
    (["train.tensorboard=yes"], "train.tensorboard='yes': must be true or false"),
    (["train.tensorboard=1"], "train.tensorboard=1: must be true or false"),
    (["model.num_layers=true"], "model.num_layers=true: must be an integer"),
    (["model.num_layers=2.0"], "model.num_layers=2.0: must be an integer"),
    (["moe.capacity_factor=abc"], "moe.capacity_factor='abc': must be a number or null"),
    (["moe.capacity_factor=.inf"], "moe.capacity_factor=inf: must be a finite number"),
    (["moe.num_experts=6", "parallel.ep_size=4"], "moe.num_experts=6: must be divisible by parallel.ep_size (4)"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4: must be one of 0|1|2|3"),
    (["lora.targets=[gate,qkv]"], "lora.targets=['gate', 'qkv']: each must be one of gate|up|down ('qkv' is not)"),
    (["train.adam_betas=[0.9]"], "train.adam_betas=[0.9]: must be a list of 2 numbers"),
    (["moe.top_k.x=1"], "moe.top_k.x: moe.top_k is not a mapping"),
    (["moe.top_k"], "override 'moe.top_k': expected key=value, e.g. moe.top_k=2"),
    (["train.lr=[1"], "train.lr='[1': invalid YAML: expected ',' or ']', but got '<stream end>' "
                      "(while parsing a flow sequence)"),
    (["moe=3"], "moe=3: must be a mapping of moe keys"),
])
def test_error_messages(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_unknown_key_without_close_match_lists_allowed():
    with pytest.raises(ConfigError, match=r"^parallel\.zzz: unknown key \(allowed in parallel: ep_size, timeout_s\)$"):
        load_config(None, ["parallel.zzz=1"])
    with pytest.raises(ConfigError, match=r"^qqq: unknown key \(allowed: name, model, moe, "):
        load_config(None, ["qqq=1"])


def test_yaml_problems_are_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("moe:\n  top_k: 2\n  top_k: 3\n")
    with pytest.raises(ConfigError, match=r"^moe\.top_k: duplicate key \(.*bad\.yaml line 3\)$"):
        load_config(p, [])
    with pytest.raises(ConfigError, match=r"^deepspeed\.extra\.a\.b: duplicate key \(deepspeed\.extra="):
        load_config(None, ["deepspeed.extra={a: {b: 1, b: 2}}"])
    p.write_text("base: &b {top_k: 2}\nmoe: *b\n")
    with pytest.raises(ConfigError, match=r"^base: unknown section"):      # aliases are fine
        load_config(p, [])
    p.write_text("moe:\n  top_k: [2\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, [])
    assert "\n" not in str(err.value) and "bad.yaml:" in str(err.value)
    with pytest.raises(ConfigError, match=r"^config file '.*missing\.yaml': No such file or directory$"):
        load_config(tmp_path / "missing.yaml", [])
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must be a mapping of sections, got list$"):
        load_config(p, [])


def test_config_error_is_value_error_and_one_line():
    err = ConfigError("a\nb   c")
    assert isinstance(err, ValueError) and str(err) == "a b c"


def test_paths_that_must_exist(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello")
    cfg = load_config(None, ["data.source=file", f"data.path={text}", f"train.resume={tmp_path}",
                             f"model.from_hf={tmp_path}", "train.resume=auto"])
    assert cfg.data.path == str(text) and cfg.train.resume == "auto"
    with pytest.raises(ConfigError, match=r"^data\.path='.*nope\.txt': no such file"):
        load_config(None, ["data.source=file", f"data.path={tmp_path / 'nope.txt'}"])


def test_validate_world_size():
    cfg = load_config(None, ["parallel.ep_size=4"])
    validate_world_size(cfg, 8)
    with pytest.raises(ConfigError, match=r"^parallel\.ep_size=4: must divide the world size \(6\)$"):
        validate_world_size(cfg, 6)


def test_valid_edge_values_accepted():
    load_config(None, ["moe.capacity_factor=0", "model.moe_every=0", "lora.mode=full", "moe.top_k=8",
                       "train.warmup_steps=100", "data.val_fraction=0.5", "model.num_kv_heads=1",
                       "deepspeed.bf16=true", "train.lr_schedule=constant", "train.min_lr=1.0",
                       "moe.num_shared_experts=1", "moe.shared_expert_gate=true", "lora.mode=none",
                       "lora.rank=0", "data.seq_len=128"])
    assert math.isclose(load_config(None, ["train.lr=1"]).train.lr, 1.0)


# ----------------------------------------------------------------------- docs

def test_readme_lists_every_key_and_matches_generated_table():
    readme = (ROOT / "configs/README.md").read_text()
    for key in config_keys():
        assert f"| `{key}` |" in readme, f"configs/README.md does not document {key}"
    block = re.search(r"<!-- keys:begin -->\n(.*)<!-- keys:end -->", readme, re.S).group(1)
    assert block == cli.describe_config(markdown=True), (
        "configs/README.md key table is stale: regenerate with "
        "`python -m moedist train --help-config=markdown` and paste between the markers")


def test_help_config_text_lists_every_key(capsys):
    assert cli.main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for info in config_schema():
        assert f"  {info.key}: {info.type_name} = {info.default_text}" in out
        assert info.help in out


def test_config_and_cli_do_not_import_torch():
    code = ("import sys, moedist.cli, moedist.config; from moedist.cli import main\n"
            "rc = main(['train', 'moe.top_k=9'])\n"
            "assert rc == 2, rc\n"
            "heavy = sorted(m for m in ('torch', 'deepspeed', 'transformers', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
