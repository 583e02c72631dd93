"""Cross-key checks of the lifelong-learning keys: moe.expert_groups, moe.group_routing, moe.freeze_experts.

Called from :func:`moedist.config.validate`; no torch here. Every problem is one
:class:`ConfigError` line starting with the dotted key.
"""
from __future__ import annotations

from typing import Any, Dict, List

from moedist.config_yaml import ConfigError


def _ids(key: str, value: Any, num_experts: int) -> List[int]:
    """A list of distinct expert ids in [0, num_experts)."""
    if not isinstance(value, list) or not all(type(x) is int for x in value):
        raise ConfigError(f"{key}={value!r}: must be a list of expert ids (integers)")
    bad = [x for x in value if not 0 <= x < num_experts]
    if bad:
        raise ConfigError(f"{key}={value!r}: expert id {bad[0]} is out of range 0..{num_experts - 1} "
                          f"(moe.num_experts={num_experts})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={value!r}: has duplicate expert ids")
    return value


def validate_lifelong(cfg: Any) -> None:
    """moe.expert_groups names data sources and holds >= top_k valid ids; moe.freeze_experts ids are valid
    and, under DeepSpeed, frozen slices cannot drift (no weight decay, ZeRO <= 2)."""
    moe, E = cfg.moe, cfg.moe.num_experts
    groups: Dict[str, Any] = moe.expert_groups
    if groups and cfg.model.moe_every == 0:
        raise ConfigError("moe.expert_groups: needs MoE layers but model.moe_every=0 (dense model)")
    if (groups or moe.group_routing != "learned") and moe.router_type != "token_choice":
        raise ConfigError(f"moe.router_type={moe.router_type!r}: expert groups and group_routing=random need "
                          "token_choice routing (an expert choosing tokens could take ones outside their group)")
    names = [s.get("name") for s in cfg.data.sources]
    if groups and not names:
        raise ConfigError("moe.expert_groups: a group is picked by a sequence's data source, so it needs named "
                          "data.sources (byte-level data.source has none); set {} or list data.sources")
    for name, ids in groups.items():
        key = f"moe.expert_groups.{name}"
        if name not in names:
            raise ConfigError(f"{key}: no data source named {name!r} (data.sources: {', '.join(names)})")
        ids = _ids(key, ids, E)
        if len(ids) < moe.top_k:
            raise ConfigError(f"{key}={ids!r}: {len(ids)} expert(s) < moe.top_k={moe.top_k}; a token of this "
                              "domain must find top_k experts inside its group")
    frozen = _ids("moe.freeze_experts", moe.freeze_experts, E)
    if frozen and cfg.model.moe_every == 0:
        raise ConfigError("moe.freeze_experts: needs MoE layers but model.moe_every=0 (dense model)")
    ds = cfg.deepspeed
    if frozen and ds.enabled and ds.zero_stage > 2:
        raise ConfigError(f"moe.freeze_experts: not supported with deepspeed.zero_stage={ds.zero_stage} "
                          "(use zero_stage <= 2 or the plain runner)")
    if frozen and ds.enabled and cfg.train.weight_decay != 0:
        raise ConfigError(f"moe.freeze_experts: under DeepSpeed needs train.weight_decay=0 (got "
                          f"{cfg.train.weight_decay}): decay would move the frozen slices of the flat fp32 master "
                          "weights; the plain runner has no such limit")
