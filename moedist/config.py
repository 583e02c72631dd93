"""Typed run configuration: dataclasses, YAML loading, dotted overrides, one validation pass.

    cfg = load_config("configs/tiny.yaml", ["moe.top_k=1", "lora.targets=[gate,up]"])
    save_config(cfg, "runs/tiny/config.yaml")

Each field documents itself in ``field(metadata={"help": ...})`` beside its allowed
values (``choices``) and bounds (``ge/gt/le/lt``); that metadata drives the checks,
``moedist train --help-config`` and the key table in ``configs/README.md``. Every
problem raises :class:`ConfigError`, one line that starts with the dotted key.
No torch here: the CLI validates a config before it pays for importing torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from moedist import choices as C
from moedist.choices import LORA_TARGETS, SOURCE_FORMATS
from moedist.config_rules import cross_key_rules, validate_world_size  # noqa: F401 (part of the config API)
from moedist.config_yaml import ConfigError, YamlDumper, dump_yaml, parse_yaml  # noqa: F401 (re-exported)
from moedist.config_yaml import fmt_value as _fmt


def _opt(default, help, *, choices=None, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with its help text and the per-key constraints :func:`validate` applies."""
    md = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=md)
    return field(default=default, metadata=md)




@dataclass
class ModelConfig:
    vocab_size: int = _opt(256, "Vocabulary size; byte-level data (no model.from_hf) needs >= 256.", ge=1)
    hidden_size: int = _opt(64, "Model width H.", ge=1)
    num_layers: int = _opt(2, "Number of decoder layers.", ge=1)
    num_heads: int = _opt(4, "Attention (query) heads; must divide hidden_size.", ge=1)
    num_kv_heads: int = _opt(4, "Key/value heads (grouped-query attention); must divide num_heads.", ge=1)
    ffn_size: int = _opt(128, "Hidden size F of dense FFNs (and of experts unless moe.expert_ffn_size).", ge=1)
    max_seq_len: int = _opt(128, "Longest sequence the model supports (rotary table size).", ge=1)
    rope_theta: float = _opt(10000.0, "Rotary embedding base.", gt=0)
    norm_eps: float = _opt(1e-5, "RMSNorm epsilon.", gt=0)
    moe_every: int = _opt(1, "Which layers are MoE: 1 = every layer, 0 = dense model, n = every n-th "
                             "layer (layer i is MoE when (i + 1) % n == 0).", ge=0)
    tie_embeddings: bool = _opt(False, "Share the input embedding with the output projection.")
    from_hf: str | None = _opt(None, "Local Hugging Face model directory to start from (its dimensions "
                                     "replace the ones here); null = random init.")
    init_from: str | None = _opt(None, "A moedist checkpoint or run directory (e.g. the output of moedist convert "
                                       "from-hf/upcycle) whose architecture and weights start this run at step 0 "
                                       "with a fresh optimizer; null = none. Continue a run with train.resume.")
    dtype: str = _opt("float32", "Dtype of the frozen weights in the LoRA modes: bfloat16 stores and runs the base "
                      "in bf16 while adapters (and any other trainable parameter) keep fp32 master weights and "
                      "optimizer state and routers compute in fp32; with lora.mode=none it needs deepspeed.bf16. "
                      "float16 is refused.", choices=C.DTYPES)
    init_std: float = _opt(0.02, "Std of the normal init of linear and embedding weights.", gt=0)
    head_dim: int | None = _opt(None, "Attention head dimension; null = hidden_size / num_heads (set by HF import).", ge=1)
    attention_bias: bool = _opt(False, "Bias on the q/k/v projections (Qwen2).")
    qk_norm: bool = _opt(False, "RMSNorm on each head's queries and keys (Qwen3).")
    mlp_only_layers: list[int] = _opt([], "Layer indices (0 .. num_layers - 1) that stay dense even where moe_every "
                                          "makes them MoE (Qwen2/3-MoE; set by HF import).")
    rope_scaling: dict[str, Any] | None = _opt(None, "Rotary scaling as in HF config.json: {rope_type: linear, "
                                                     "factor} or {rope_type: llama3, factor, low_freq_factor, "
                                                     "high_freq_factor, original_max_position_embeddings}; null "
                                                     "= none (set by HF import).")
    hf_model_type: str | None = _opt(None, "Hugging Face model_type the architecture came from (set by model.from_hf "
                                           "and convert from-hf, kept by model.init_from); informational: the "
                                           "export picks its architecture from the model itself. null = not "
                                           "imported.", choices=C.HF_MODEL_TYPES)


@dataclass
class MoEConfig:
    num_experts: int = _opt(8, "Routed experts E per MoE layer (lora.mode=moe_lora: LoRA experts).", ge=1)
    top_k: int = _opt(2, "Experts K chosen per token.", ge=1)
    capacity_factor: float | None = _opt(None, "Expert capacity = ceil(factor * T * K / E) tokens; 0 or "
                                               "null = dropless (no token dropped).", ge=0)
    min_capacity: int = _opt(4, "Lower bound on the capacity when a capacity_factor is set.", ge=0)
    num_shared_experts: int = _opt(0, "Always-on shared experts (DeepSeek/Qwen2-MoE), replicated on all ranks.", ge=0)
    shared_expert_gate: bool = _opt(False, "Scale the shared experts' output by a sigmoid gate (Qwen2-MoE).")
    shared_expert_ffn_size: int | None = _opt(None, "Total hidden size of the shared experts; null = "
                                                    "num_shared_experts * expert FFN size.", ge=1)
    drop_policy: str = _opt("probs", "Which tokens an over-full expert keeps: 'position' = first come, "
                                     "'probs' = highest router probability.", choices=C.DROP_POLICIES)
    aux_loss_type: str = _opt("switch", "Load-balancing loss: 'switch' (fraction x probability, Switch "
                                        "Transformer), 'importance' (squared CV of importance), 'none'.",
                              choices=C.AUX_LOSS_TYPES)
    aux_loss_coef: float = _opt(0.01, "Weight of the load-balancing loss.", ge=0)
    z_loss_coef: float = _opt(0.0, "Weight of the router z-loss (ST-MoE); 0 = off.", ge=0)
    score_func: str = _opt("softmax", "Router scores: softmax over experts or per-expert sigmoid.",
                           choices=C.SCORE_FUNCS)
    renormalize: bool = _opt(True, "Rescale the top-k weights of a token to sum to 1.")
    noisy_gating: bool = _opt(False, "Add Gaussian noise to router logits while training (noisy top-k).")
    jitter_eps: float = _opt(0.0, "Multiplicative jitter 1 +- eps on router inputs while training; 0 = off.", ge=0)
    expert_bias: bool = _opt(False, "Aux-loss-free balancing: a per-expert bias added for top-k selection "
                                    "only, updated from expert load (DeepSeek-V3); needs score_func=sigmoid.")
    expert_bias_update_rate: float = _opt(0.001, "With expert_bias=true: after every optimizer step each MoE layer's "
                                                 "bias moves by rate * sign(mean load - load of the expert), the load "
                                                 "being the (token, expert) pairs routed to it over the whole global "
                                                 "batch (all ranks and micro-batches, before capacity dropping); "
                                                 "0.001 as in DeepSeek-V3; 0 = a fixed bias. The bias is a buffer, "
                                                 "saved in checkpoints, not trained by the optimizer.", ge=0)
    router_type: str = _opt("token_choice", "Who chooses: 'token_choice' = each token picks its top_k experts; 'expert_choice' "
                                            "= each expert picks its capacity C = ceil(capacity_factor * T * top_k "
                                            "/ E) highest-scoring tokens (Zhou et al. 2022; a token may get 0 to E "
                                            "experts). The choice is made per rank and micro-batch over its own T "
                                            "tokens, before dispatch, as in other implementations, so a token's "
                                            "experts depend on the other tokens of its micro-batch (not causal: "
                                            "decoding routes differently from training); needs a capacity_factor "
                                            "and aux_loss_type=none.",
                             choices=C.ROUTER_TYPES)
    second_expert_policy: str = _opt("all", "With top_k=2: 'all' = every token goes to both experts; 'random' = in "
                                            "training the second expert is used with probability min(1, 2 * w2) of "
                                            "its weight after renormalisation, w2 = p2 / (p1 + p2) (GShard "
                                            "Algorithm 1; fairseq top2gating second_expert_policy='random' with "
                                            "normalize_gate_prob_before_dropping); a skipped "
                                            "pair does not take capacity and the first weight is not rescaled. "
                                            "Draws from the router's own generator, saved with the RNG state.",
                                     choices=C.SECOND_EXPERT_POLICIES)
    eval_capacity_factor: float | None = _opt(None, "Capacity factor used in evaluation (model.eval()); null = the "
                                                    "same as capacity_factor, 0 = dropless in evaluation.", ge=0)
    expert_ffn_size: int | None = _opt(None, "Hidden size of each routed expert; null = model.ffn_size.", ge=1)
    activation: str = _opt("swiglu", "Expert and FFN activation.", choices=C.MODEL_ACTIVATIONS)
    expert_groups: dict[str, Any] = _opt({}, "Per-domain expert groups (PanGu-Sigma): {source name: [expert ids]}; "
                                             "tokens of a data.sources entry route only to its group's experts "
                                             "(router scores outside it are masked before top-k; a group needs >= "
                                             "top_k experts); sources without a group route over all experts. "
                                             "{} = off.")
    group_routing: str = _opt("learned", "Routing inside a group: 'learned' = the router's top-k; 'random' = "
                                         "PanGu-Sigma random-routed experts: a fixed hash of (token id, layer) "
                                         "picks top_k consecutive experts of the group, combine weights 1/top_k.",
                              choices=C.GROUP_ROUTING)
    freeze_experts: list[int] = _opt([], "Expert ids whose weights (their LoRA adapters in lora.mode moe_lora/"
                                         "expert_lora) and router rows stay bitwise unchanged in training (the "
                                         "shared LoRA expert, lora.shared_rank, still trains); [] = none. "
                                         "Under DeepSpeed needs train.weight_decay=0 and zero_stage <= 2.")


@dataclass
class LoRAConfig:
    rank: int = _opt(8, "LoRA rank r (must be > 0 unless mode is none).", ge=0)
    shared_rank: int = _opt(0, "Rank of a shared LoRA expert in lora.mode=moe_lora: one LoRA adapter on the "
                               "frozen FFN that every token gets, added to every routed expert's projections "
                               "(DeepSeekMoE-style shared expert; same alpha, dropout and targets; scale "
                               "alpha / shared_rank); replicated, not frozen by moe.freeze_experts; 0 = off.", ge=0)
    alpha: float | None = _opt(None, "LoRA updates are scaled by alpha / rank; null = rank (scale 1).", gt=0)
    dropout: float = _opt(0.0, "Dropout on the LoRA branch.", ge=0, lt=1)
    mode: str = _opt("none", "Adapter mode: 'none' = no adapters, all weights train; 'moe_lora' = frozen "
                             "base whose FFNs gain a router over moe.num_experts LoRA experts; "
                             "'expert_lora' = LoRA on each real expert; 'full' = LoRA on attention and "
                             "every FFN/expert.", choices=C.LORA_MODES)
    targets: list[str] = _opt(list(LORA_TARGETS), "FFN projections that get LoRA adapters.", choices=LORA_TARGETS)
    train_router: bool = _opt(True, "Train the router weights when the base is frozen.")
    train_shared_experts: bool = _opt(False, "Train the shared experts when the base is frozen.")


@dataclass
class ParallelConfig:
    ep_size: int = _opt(1, "Expert-parallel size: ranks that split each layer's experts; must divide "
                           "moe.num_experts and the world size.", ge=1)
    timeout_s: float = _opt(600.0, "Collective timeout in seconds: a rank that dies or stalls makes the "
                                   "others exit non-zero within it.", gt=0)


@dataclass
class TrainConfig:
    max_steps: int = _opt(100, "Optimizer steps to run.", ge=1)
    lr: float = _opt(3e-4, "Peak learning rate.", gt=0)
    min_lr: float = _opt(0.0, "Final learning rate of the cosine/linear decay.", ge=0)
    warmup_steps: int = _opt(10, "Linear warm-up steps; more than max_steps is clamped to max_steps with a "
                                 "warning.", ge=0)
    lr_schedule: str = _opt("cosine", "Learning-rate schedule after warm-up.", choices=C.LR_SCHEDULES)
    weight_decay: float = _opt(0.1, "Decoupled weight decay.", ge=0)
    adam_betas: tuple[float, float] = _opt((0.9, 0.95), "AdamW betas [beta1, beta2], each in [0, 1).")
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this value; 0 = off.", ge=0)
    seed: int = _opt(1234, "Seed for parameter init and dropout.", ge=0)
    output_dir: str = _opt("runs/moedist", "Directory for checkpoints, logs and the resolved config.")
    micro_batch_size: int = _opt(4, "Sequences per rank per forward pass.", ge=1)
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step.", ge=1)
    save_every: int = _opt(0, "Save a checkpoint every N steps; 0 = only at the end.", ge=0)
    log_every: int = _opt(10, "Log metrics every N steps.", ge=1)
    eval_every: int = _opt(0, "Evaluate on the validation split every N steps; 0 = off.", ge=0)
    eval_batches: int = _opt(4, "Validation micro-batches per evaluation in all, split across the ranks "
                                  "(the same sequences, so the same loss, at any world size).", ge=1)
    resume: str | None = _opt(None, "Where to resume: null = start fresh; 'auto' = newest checkpoint in "
                                    "output_dir that verifies (SHA-256; corrupt ones are skipped with a warning), "
                                    "or start fresh if there is none; or a checkpoint directory.")
    tensorboard: bool = _opt(False, "Write TensorBoard event files to output_dir.")
    plot: bool = _opt(False, "Save loss/throughput plots (PNG) to output_dir at the end.")
    optimizer: str = _opt("adamw", "Optimizer.", choices=C.OPTIMIZERS)
    save_on_interrupt: bool = _opt(True, "Ctrl-C (SIGINT) finishes the current step, saves a checkpoint, prints "
                                         "the resume command and exits 130; false = stop without saving.")
    keep_last: int = _opt(3, "Step checkpoints kept under output_dir/checkpoints (older ones are deleted after "
                             "each save; final/ and the one 'latest' names are never deleted); 0 = keep all.", ge=0)
    nonfinite: str = _opt("stop", "A NaN/Inf loss or gradient: 'stop' = exit with one line naming the step and the "
                                  "first non-finite parameter gradient (or the loss); 'skip' = drop that step on every "
                                  "rank (no optimizer update) and count it in metrics (skipped_steps); under DeepSpeed "
                                  "needs zero_stage >= 1.", choices=C.NONFINITE_POLICIES)
    activation_checkpointing: str = _opt("none", "Recompute activations in backward instead of keeping them: "
                                               "'none'; 'moe' = only the MoE FFNs (router, all-to-all, experts); "
                                               "'full' = every decoder layer. Same losses, less activation memory, "
                                               "about one extra forward of compute.", choices=C.ACT_CKPT_MODES)
    expert_grads: str = _opt("auto", "Stacked [E, H, F] expert weight gradients between steps (PyTorch runner; DeepSpeed "
                                     "manages its own): 'kept' = allocated once and overwritten in place by each step's "
                                     "first backward (no per-step allocation or zeroing, but resident through the "
                                     "forward: peak memory + their size); 'fresh' = allocated uninitialised in backward "
                                     "and freed after the optimizer step, as autograd does (lowest peak memory); 'auto' "
                                     "= 'kept' on CPU, where glibc maps every fresh block of this size anew and "
                                     "page-faults it, 'fresh' on GPUs, whose caching allocator reuses the block.",
                             choices=C.EXPERT_GRADS)
    ema_decay: float = _opt(0.0, "Keep an exponential moving average of the trainable weights (fp32, from the step-0 "
                                 "weights, updated after every optimizer step: ema = d*ema + (1-d)*w), evaluated and "
                                 "saved as output_dir/final_ema/ at the end; 0 = off. Typical 0.99-0.9999.", ge=0, lt=1)
    swa_start: int = _opt(0, "Stochastic weight averaging: the equal-weight mean of the trainable weights after every "
                             "optimizer step from this step on (inclusive) to max_steps, evaluated and saved as "
                             "output_dir/final_swa/; 0 = off.", ge=0)
    lawa_k: int = _opt(0, "LAWA: the mean of the trainable weights of the latest k step checkpoints (needs "
                          "save_every > 0 and keep_last 0 or >= k; the final step is always saved), evaluated and "
                          "saved as output_dir/final_lawa/; 0 = off.", ge=0)


@dataclass
class DataConfig:
    source: str = _opt("pydoc", "Training text: 'pydoc' = English prose of pydoc_data.topics, 'stdlib' = "
                                "the standard library's .py sources, 'file' = a UTF-8 text file at "
                                "data.path.", choices=C.DATA_SOURCES)
    path: str | None = _opt(None, "Text file for source=file.")
    seq_len: int = _opt(64, "Tokens per training sequence (<= model.max_seq_len).", ge=2)
    val_fraction: float = _opt(0.1, "Share of the data held out for validation, in (0, 1).", gt=0, lt=1)
    seed: int = _opt(0, "Seed for the train/validation split and shuffling.", ge=0)
    tokenizer: str | None = _opt(None, "Tokenizer: a local Hugging Face tokenizer directory, or 'bytes' (raw "
                                       "UTF-8 bytes, vocabulary 256); null = the model.from_hf directory when it "
                                       "holds a tokenizer, else bytes.")
    sources: list[dict[str, Any]] = _opt([], "Named training sources; when given they replace data.source/"
                                              "data.path. Each is a mapping {name, path, format, weight, "
                                              "text_field}: path = a file or a directory of files; format = "
                                              + "|".join(SOURCE_FORMATS) + "; weight = share of training "
                                              "sequences (default 1); text_field = the JSON/parquet field "
                                              "holding the document (default 'text').")
    pack: bool = _opt(True, "Pack documents into data.seq_len windows (attention and positions restart at "
                            "each document); false = one document per sequence, truncated and padded.")
    cache_dir: str = _opt("~/.cache/moedist", "Where tokenized data is cached as memory-mapped shards "
                                             "(keyed by a hash of the files, the tokenizer and the data settings).")


@dataclass
class DeepSpeedConfig:
    enabled: bool = _opt(False, "Run under a DeepSpeed engine.")
    zero_stage: int = _opt(0, "ZeRO stage.", choices=C.ZERO_STAGES)
    bf16: bool = _opt(False, "DeepSpeed bf16 mixed precision.")
    fp16: bool = _opt(False, "DeepSpeed fp16 mixed precision with loss scaling.")
    offload_optimizer: str = _opt("none", "ZeRO-Offload: keep optimizer state and fp32 master weights in CPU memory "
                                          "and step them with DeepSpeed's CPU Adam ('cpu'; needs zero_stage >= 1 and "
                                          "train.optimizer=adamw).", choices=C.OFFLOAD_DEVICES)
    offload_param: str = _opt("none", "ZeRO-Infinity parameter offload: keep this rank's parameter partition in CPU "
                                      "memory ('cpu'; zero_stage=3 only).", choices=C.OFFLOAD_DEVICES)
    extra: dict[str, Any] = _opt({}, "Mapping deep-merged into the generated DeepSpeed JSON (wins on conflict).")


@dataclass
class MoedistConfig:
    name: str = _opt("moedist", "Run name (logs, plots).")
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


_SECTIONS = [f.name for f in dataclasses.fields(MoedistConfig)]    # and the top-level key `name`


# ------------------------------------------------------------------ schema

_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le),
           ("lt", "<", operator.lt))


@dataclass(frozen=True)
class KeyInfo:
    """One documented leaf key of :class:`MoedistConfig` (see :func:`config_schema`)."""

    key: str                 # dotted, e.g. "moe.top_k"
    annotation: Any          # e.g. float | None
    default: Any
    metadata: Any            # help, choices, ge/gt/le/lt

    @property
    def help(self) -> str:
        return self.metadata["help"]

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    @property
    def allowed(self) -> str:
        """The per-key constraints as text, e.g. ``one of softmax|sigmoid`` or ``>= 1``."""
        md = self.metadata
        parts = ["one of " + "|".join(map(str, md["choices"]))] if md["choices"] is not None else []
        return ", ".join(parts + [f"{sym} {md[op]}" for op, sym, _ in _BOUNDS if md[op] is not None])

    @property
    def default_text(self) -> str:
        text = yaml.dump(_plain(self.default), Dumper=YamlDumper, default_flow_style=True, width=10**6)
        return text.strip().removesuffix("...").strip()


@functools.cache
def config_schema() -> tuple[KeyInfo, ...]:
    """Every leaf key in declaration order: ``name``, ``model.vocab_size``, ..."""
    def default(f):
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    out = []
    for f in dataclasses.fields(MoedistConfig):
        tp = typing.get_type_hints(MoedistConfig)[f.name]
        if not dataclasses.is_dataclass(tp):
            out.append(KeyInfo(f.name, tp, default(f), f.metadata))
            continue
        hints = typing.get_type_hints(tp)
        out += [KeyInfo(f"{f.name}.{g.name}", hints[g.name], default(g), g.metadata)
                for g in dataclasses.fields(tp)]
    return tuple(out)


def config_keys() -> list[str]:
    """Every dotted key, e.g. ``['name', 'model.vocab_size', ...]``."""
    return [info.key for info in config_schema()]


def _suggest(dotted: str) -> str:
    """' did you mean X?' for an unknown key: misspelt section, key of another section, misspelt key."""
    keys, sections = config_keys(), _SECTIONS
    head, _, rest = dotted.partition(".")
    if not rest:
        close = difflib.get_close_matches(head, sections, n=1, cutoff=0.6)
        return f", did you mean {close[0]}?" if close else f" (allowed: {', '.join(sections)})"
    if head not in sections:
        head = next(iter(difflib.get_close_matches(head, sections, n=1, cutoff=0.6)), head)
    leaves = [k.split(".", 1)[1] for k in keys if k.startswith(head + ".")]
    close = ([f"{head}.{rest}"] if rest in leaves else
             [k for k in keys if k.rsplit(".", 1)[-1] == rest] or
             [f"{head}.{m}" for m in difflib.get_close_matches(rest, leaves, n=1, cutoff=0.6)])
    if close:
        return f", did you mean {close[0]}?"
    return f" (allowed in {head}: {', '.join(leaves)})" if leaves else f" (allowed: {', '.join(sections)})"


# ---------------------------------------------------------- values and types

def _type_name(tp) -> str:
    """Name of an annotation in --help-config, the README and error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return f"{_type_name(next(a for a in args if a is not type(None)))} | null"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return "mapping" if origin is dict else {int: "int", float: "float", bool: "bool", str: "str"}[tp]


_MUST = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
         "list[str]": "a list of strings", "list[int]": "a list of integers", "[float, float]": "a list of 2 numbers", "mapping": "a mapping",
         "list[mapping]": "a list of mappings", "null": "null"}


def _coerce(key: str, value, tp, must: str | None = None):
    """Check ``value`` against annotation ``tp``; return it normalized (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    must = must or " or ".join(_MUST[p] for p in _type_name(tp).split(" | "))
    bad = ConfigError(f"{key}={_fmt(value)}: must be {must}")
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(key, value, inner, must)
    if tp in (bool, int, str):
        if type(value) is not tp:            # strict: 'yes' and 1 are no bools, True is no int
            raise bad
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{key}={_fmt(value)}: must be a finite number")
        return float(value)
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(key, x, args[0], must) for x in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(key, x, a, must) for x, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}={_fmt(value)}: must be a mapping with string keys")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _check_bounds(key: str, value, md) -> None:
    """Apply ``choices`` and ``ge/gt/le/lt`` from the field metadata (skipped for null)."""
    if value is None:
        return
    if md["choices"] is not None:
        allowed = "|".join(map(str, md["choices"]))
        for item in value if isinstance(value, list) else [value]:
            if item not in md["choices"] and isinstance(value, list):
                raise ConfigError(f"{key}={_fmt(value)}: each must be one of {allowed} ({_fmt(item)} is not)")
            if item not in md["choices"]:
                raise ConfigError(f"{key}={_fmt(value)}: must be one of {allowed}")
    for op, sym, ok in _BOUNDS:
        if md[op] is not None and not ok(value, md[op]):
            raise ConfigError(f"{key}={_fmt(value)}: must be {sym} {md[op]}")


# ------------------------------------------------------------ build and load

def _set_dotted(raw: dict, item: str) -> None:
    """Apply one ``a.b=value`` override to the raw nested mapping (``a.b.c`` goes into a mapping key)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. moe.top_k=2")
    path = key.split(".")
    value = parse_yaml(text, f"{key}={text!r}", tuple(path))
    schema = {info.key: info.annotation for info in config_schema()}
    if key not in _SECTIONS or key in schema:     # else a whole section: moe={top_k: 1}
        leaf = path[0] if path[0] in schema else ".".join(path[:2])
        if leaf not in schema:
            raise ConfigError(f"{key}: unknown key{_suggest(key)}")
        if key != leaf and typing.get_origin(schema[leaf]) is not dict:
            raise ConfigError(f"{key}: {leaf} is not a mapping")
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def config_from_dict(raw: dict) -> MoedistConfig:
    """Build a config from a nested mapping (missing keys keep defaults) and validate it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config={_fmt(raw)}: must be a mapping of sections ({', '.join(_SECTIONS)})")
    top = typing.get_type_hints(MoedistConfig)
    kwargs = {}
    for name, value in raw.items():
        if name not in top:
            raise ConfigError(f"{name}: unknown section{_suggest(str(name))}")
        tp = top[name]
        if not dataclasses.is_dataclass(tp):
            kwargs[name] = _coerce(name, value, tp)
            continue
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={_fmt(value)}: must be a mapping of {name} keys")
        hints = typing.get_type_hints(tp)
        for key in value:
            if key not in hints:
                raise ConfigError(f"{name}.{key}: unknown key{_suggest(f'{name}.{key}')}")
        kwargs[name] = tp(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in value.items()})
    cfg = MoedistConfig(**kwargs)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> MoedistConfig:
    """Read a YAML file (None = defaults), apply ``key=value`` overrides in order, validate.

    Override values are YAML: ``moe.capacity_factor=null``, ``lora.targets=[gate,up]``,
    ``deepspeed.extra.gradient_clipping=1.0``.

    Raises:
        ConfigError: a one-line message naming the dotted key, the value and what is allowed.
    """
    raw: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as err:
            raise ConfigError(f"config file {os.fspath(path)!r}: {err.strerror or err}") from None
        raw = parse_yaml(text, os.fspath(path))
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {os.fspath(path)!r}: must be a mapping of sections, "
                              f"got {type(raw).__name__}")
    for item in overrides or []:
        _set_dotted(raw, item)
    return config_from_dict(raw)


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def config_to_dict(cfg: MoedistConfig) -> dict:
    """Plain nested dict of lists, dicts and scalars (YAML/JSON ready)."""
    return _plain(dataclasses.asdict(cfg))


def chmod_umask(path: str | os.PathLike) -> None:
    """Give a file made by `tempfile.mkstemp` (mode 0600) the mode the process umask gives new files."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_config(cfg: MoedistConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back equal; atomic (temp + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config-", suffix=".yaml.tmp")
    try:
        chmod_umask(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dump_yaml(config_to_dict(cfg)))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------- validation

def validate(cfg: MoedistConfig) -> None:
    """The one validation pass: types, per-key bounds, then cross-key rules. Does not modify ``cfg``.

    Raises:
        ConfigError: on the first problem, one line starting with the dotted key.
    """
    for info in config_schema():
        section, _, leaf = info.key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, leaf)
        _check_bounds(info.key, _coerce(info.key, value, info.annotation), info.metadata)

    cross_key_rules(cfg)
