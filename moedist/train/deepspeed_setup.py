"""DeepSpeed set-up: groups, parameter tagging, engine config (with `deepspeed_runner`, the only DeepSpeed code).

Checked against DeepSpeed 0.19.8 (setup.py pins >=0.19,<0.20); see
`shared/notes/deepspeed-moe.md` for the experiments behind each choice.

Order (every rank):

    dims = init_expert_groups(ep)        # deepspeed.init_distributed + DeepSpeed's EP/EDP groups
    model = parallelize(build_model(cfg), dims.ep_comm)   # all-to-all over DeepSpeed's EP group
    prepare_model(model, ep, zero_stage) # tag expert params; make DeepSpeed see our MoE layers
    groups = optimizer_param_groups(model, weight_decay)  # expert params in their own groups
    engine = initialize(model, optimizer, ds_config(cfg, world_size))

How DeepSpeed is told which parameters are experts:

* Every expert parameter (tagged ``moedist_expert`` by `moedist.moe.experts`) gets
  ``allreduce = False`` and ``group_name = "ep_size_<ep>"``: DeepSpeed then reduces
  its gradient over the expert-data-parallel (EDP) group only, divided by the
  full data-parallel size.
* ZeRO 0/1/2: the engine only runs its expert reduction paths when the model
  contains an instance of ``deepspeed.moe.layer.MoE``. Each of our `MoELayer`s
  gets a child ``ds_moe_marker``, a ``MoE`` subclass with no parameters
  (``MoE.__init__`` never runs; its attributes are set by hand and
  ``set_deepspeed_parallelism`` is a no-op because the groups exist already).
  The layer keeps its class and forward.
* ZeRO-3: the engine refuses ``MoE`` instances, so the layers stay plain and
  the expert parameters carry AutoEP's per-parameter placement attributes
  (``ds_zero_placement_family = "autoep_expert"``, partition group name and
  EDP process group): ZeRO-3 then partitions an expert only over the ranks that
  hold the same expert and averages its gradient like AutoEP's. Every MoE layer
  is a ZeRO-3 leaf module, so all its parameters are gathered when it starts
  (experts are called through `forward_tokens` and LoRA stacks through `delta`,
  which ZeRO-3's per-module hooks would not see), and its input is made to
  require grad (else its gradient reduction misfires under a frozen base).
  The ZeRO-3 engine wraps a thin root (`Zero3Module`) that returns the loss
  tensor: ZeRO-3 re-fetches parameters for backward through hooks on returned
  tensors and cannot see inside our output dataclass.
* Optimizer param groups: ``split_params_into_different_moe_groups_for_optimizer``
  puts expert parameters in groups with ``moe=True`` and ``name=<group_name>``.
* ZeRO-1/2 need ``contiguous_gradients=True``: with it off, the fallback
  reduction (``buffered_reduce_fallback``) all-reduces expert gradients over the
  whole world, averaging different experts (found by the cross-layout test).
* The CPU shared-memory all-reduce op is skipped (`quiet_deepspeed`): it is
  JIT-compiled on first use (about a minute on 2 cores) and gloo does the work.

Gradient clipping: ZeRO-1/2/3 compute the global norm with each expert counted
once (verified). The fp32 ZeRO-0 path averages per-rank norms (DeepSpeed issue
#8475), so there DeepSpeed's clipping is switched off and the trainer clips
with `moedist.distributed.clip_grad_norm_` between backward and step.

The runner (`moedist.train.deepspeed_runner.DeepSpeedRunner`: step, learning rate, gradient
norm) and its state for checkpoints and export (fp32 masters, ZeRO-3 partitions, optimizer
state) live beside this module, in `moedist.train.deepspeed_runner`. Every stage and precision
saves in the layout-independent moedist format; DeepSpeed's own
`engine.save_checkpoint`/`load_checkpoint` are never called: their files are pickles, and
loading them could run code planted in a checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from moedist.distributed.grad_sync import is_expert_param
from moedist.moe.layer import MoELayer
from moedist.train.param_groups import decay_groups

SUPPORTED = ((0, 19), (0, 20))  # [lower, upper) DeepSpeed version range


def deepspeed_version_ok() -> bool:
    import deepspeed

    major, minor = (int(x) for x in deepspeed.__version__.split(".")[:2])
    return SUPPORTED[0] <= (major, minor) < SUPPORTED[1]


def group_name(ep_size: int) -> str:
    """DeepSpeed's key for an expert-parallel size in its group dictionaries."""
    return f"ep_size_{ep_size}"


def init_expert_groups(ep_size: int):
    """Join DeepSpeed's comm layer and create (or reuse) its EP/EDP groups.

    Returns a `ParallelDims` whose EP group is DeepSpeed's, so that the all-to-all
    of our layers and the engine's expert-gradient reduction use the same ranks.
    Collective; torch.distributed must be initialised.
    """
    import torch.distributed as dist

    from moedist.distributed.parallel_dims import ParallelDims

    quiet_deepspeed()
    if not deepspeed_version_ok():
        import warnings

        import deepspeed

        warnings.warn(f"DeepSpeed {deepspeed.__version__}: moedist's use of its internals was checked with "
                      f"0.19.x (setup.py pins >=0.19,<0.20)")
    # The engine asserts LOCAL_RANK is set; every launcher sets it, a plain process does not.
    if "LOCAL_RANK" not in os.environ and dist.is_initialized() and dist.get_world_size() == 1:
        os.environ["LOCAL_RANK"] = "0"
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised; call moedist.distributed.init_distributed() first")
    return ParallelDims.adopt(*_expert_groups(ep_size, dist.get_backend()))


def _expert_groups(ep_size: int, backend: str):
    """(EP group, EDP group) of this rank, created by DeepSpeed.

    `deepspeed.utils.groups._create_expert_and_data_parallel` and the two `_get_expert_*_group`
    getters are private API (checked with DeepSpeed 0.19.8; setup.py pins <0.20). The function only
    creates the groups for a name that does not exist yet, so calling it again is harmless.
    """
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    if not ds_comm.is_initialized():
        # torch.distributed is up already: DeepSpeed only wraps the existing group.
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    groups._create_expert_and_data_parallel(ep_size)
    name = group_name(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def quiet_deepspeed() -> None:
    """Before DeepSpeed's comm layer starts: skip its CPU shared-memory all-reduce op and its INFO logs.

    The op is JIT-compiled with ninja on first use (about a minute on 2 cores, and again whenever
    another checkout's sources share ~/.cache/torch_extensions); gloo does the same reductions.
    Probing op compatibility runs compilers too, so the probe result is set rather than computed
    (it is read only for this op). Set MOEDIST_DS_VERBOSE=1 to keep DeepSpeed's INFO logs.
    """
    import logging
    import warnings

    import deepspeed.ops as ops

    # DeepSpeed calls the deprecated name once per ZeRO all-gather.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    compat = ops.__dict__.get("__compatible_ops__")
    if compat is None:
        ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    else:
        compat["deepspeed_shm_comm"] = False
    if os.environ.get("MOEDIST_DS_VERBOSE", "0") != "1":
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)


# ------------------------------------------------------------------ model tagging

def _moe_class():
    from deepspeed.moe.layer import MoE

    return MoE


MARKER_NAME = "ds_moe_marker"  # the child each MoELayer gets under ZeRO-0/1/2
_MARKER: Dict[str, type] = {}


def _marker_class() -> type:
    """``DeepSpeedMoEMarker``: a ``deepspeed.moe.layer.MoE`` with none of MoE's parts.

    The ZeRO-0/1/2 engine runs its expert-gradient paths only when its model holds a ``MoE``;
    from each one it reads ``num_experts`` and calls ``set_deepspeed_parallelism``. Each of our
    `MoELayer`s gets a marker as a child (composition: the layer keeps its own class and
    forward). The marker holds no parameters or buffers (the state dict is unchanged) and never
    runs: ``MoE.__init__`` is not called and its forward refuses. Made on first use, as DeepSpeed
    is imported lazily; registered in this module's namespace so a model holding it pickles.
    """
    if "cls" not in _MARKER:
        MoE = _moe_class()

        class DeepSpeedMoEMarker(MoE):
            def __init__(self, num_experts: int, ep_size: int):
                nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's own gate and experts
                self.num_experts, self.ep_size = num_experts, ep_size
                self.num_local_experts = num_experts // ep_size
                self.expert_group_name = group_name(ep_size)
                self.use_residual = False
                self.enable_expert_tensor_parallelism = False

            def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: Any) -> None:
                # The groups were created by init_expert_groups before the model was built.
                from deepspeed.utils import groups

                if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                    raise RuntimeError(f"DeepSpeed group {self.expert_group_name} is missing; call "
                                       "moedist.train.deepspeed_setup.init_expert_groups first")

            def forward(self, *args: Any, **kwargs: Any):
                raise RuntimeError("DeepSpeedMoEMarker only marks a moedist MoELayer for DeepSpeed; it never runs")

        DeepSpeedMoEMarker.__module__, DeepSpeedMoEMarker.__qualname__ = __name__, "DeepSpeedMoEMarker"
        globals()["DeepSpeedMoEMarker"] = DeepSpeedMoEMarker  # importable by name: a model holding it pickles
        _MARKER["cls"] = DeepSpeedMoEMarker
    return _MARKER["cls"]


def expert_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if is_expert_param(p)]


def prepare_model(model: nn.Module, ep_size: int, zero_stage: int, dims=None) -> nn.Module:
    """Tag expert parameters for DeepSpeed and make it see the MoE layers (in place).

    Args:
        model: a parallelized model (experts already sharded over EP).
        ep_size: expert-parallel size. zero_stage: 0-3.
        dims: the `ParallelDims` from `init_expert_groups` (needed for ZeRO-3).
    """
    if zero_stage == 3 and dims is None:
        raise ValueError("prepare_model: ZeRO-3 needs dims (from init_expert_groups)")
    tag_expert_params(expert_params(model), ep_size, zero_stage, dims)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if zero_stage < 3:
        marker = _marker_class()
        for layer in layers:
            layer.add_module(MARKER_NAME, marker(layer.num_experts, ep_size))
    else:
        if layers:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, sorted({type(l) for l in layers}, key=lambda c: c.__name__))
            for layer in layers:
                layer.register_forward_pre_hook(_input_requires_grad)
    return model


def tag_expert_params(params, ep_size: int, zero_stage: int, dims=None) -> None:
    """DeepSpeed's per-parameter expert tags (see the module docstring) on the expert ones among `params`."""
    name = group_name(ep_size)
    for p in params:
        if not is_expert_param(p):
            continue
        p.allreduce = False
        p.group_name = name
        if zero_stage == 3:
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = name
            p.ds_zero_partition_process_group = dims.edp_group


def zero3_partitioner(cfg, dims):
    """A `partition(params)` callback for `moedist.models.materialize.build_partitioned_model` under ZeRO-3.

    Each chunk of freshly drawn parameters is tagged (experts: partitioned over their EDP group
    only), cast to the engine's mixed-precision dtype exactly as ``deepspeed.initialize`` would
    cast a whole model (it skips the cast for a model partitioned already), and converted by
    ``deepspeed.zero.Init``'s conversion of allocated parameters: broadcast from the partition
    group's first rank (equal values: the same seeds everywhere), then only this rank's
    partition is kept. The engine then finds every parameter partitioned and converts nothing.
    """
    import deepspeed
    from deepspeed.runtime.engine import CASTABLE_DTYPES

    ds = cfg.deepspeed
    config = ds_config(cfg, dims.world_size)
    dtype = torch.half if ds.fp16 else torch.bfloat16 if ds.bf16 else None
    init = deepspeed.zero.Init(config_dict_or_path=config, dtype=dtype or torch.float)

    def partition(params: List[nn.Parameter]) -> None:
        tag_expert_params(params, cfg.parallel.ep_size, 3, dims)
        for p in params:
            if dtype is not None and p.dtype in CASTABLE_DTYPES and p.dtype != dtype:
                p.data = p.data.to(dtype)
        init._convert_to_zero_parameters(params)

    return partition


def _input_requires_grad(module, args):
    """ZeRO-3 reduces a leaf module's gradients from a full backward hook, which misfires when
    the module's input needs no gradient (a frozen base below the first MoE layer): the router's
    gradient then reaches the reduction empty. A leaf input that requires grad avoids it."""
    x = args[0]
    if torch.is_tensor(x) and not x.requires_grad and torch.is_grad_enabled():
        return (x.detach().requires_grad_(True),) + tuple(args[1:])
    return None


class Zero3Module(nn.Module):
    """What a ZeRO-3 engine wraps: `forward(input_ids, labels, position_ids, segment_ids)` returns the loss.

    ZeRO-3 fetches a module's partitioned parameters again for backward through
    hooks on the tensors the module returns; it cannot see tensors inside our
    `CausalLMOutput` dataclass, so the root returns the loss itself and keeps the
    full output in `last_output`. The output projection weight is used by
    `CausalLM.forward` without calling `lm_head`, so it is registered as an
    external parameter of this root module.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.last_output = None

    def forward(self, input_ids, labels, position_ids=None, segment_ids=None, domain_ids=None):
        out = self.model(input_ids, labels, position_ids, segment_ids, domain_ids=domain_ids)
        self.last_output = out
        return out.loss


def wrap_for_zero3(model: nn.Module) -> Zero3Module:
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    root = Zero3Module(model)
    register_external_parameter(root, model.output_weight())
    return root


def full_ndim(p: torch.Tensor) -> int:
    """Dimensions of `p` as built (a ZeRO-3 partitioned parameter's own data is an empty 1-d tensor)."""
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.ndim


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters in AdamW groups (decay for matrices, none for vectors),
    with expert parameters moved into DeepSpeed MoE groups. Empty groups are dropped.

    Frozen parameters are not in any group, so no optimizer state exists for them.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer(decay_groups(model, weight_decay, full_ndim))
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------ engine config

def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def ds_config(cfg, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed JSON for a run; ``deepspeed.extra`` is deep-merged last."""
    tr, ds = cfg.train, cfg.deepspeed
    stage = ds.zero_stage
    zero: Dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        # contiguous_gradients=False takes buffered_reduce_fallback, which all-reduces expert
        # gradients over the whole world (mixing different experts): keep it on.
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if ds.offload_optimizer == "cpu":  # ZeRO-Offload: fp32 masters + Adam state in CPU memory, stepped by CPU Adam
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param == "cpu":  # ZeRO-3 only (config.validate): the parameter partition lives in CPU memory
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    conf: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * world_size,
        # ZeRO-0 fp32 clipping is wrong under EP: the trainer clips there itself.
        "gradient_clipping": 0.0 if clips_itself(cfg) else tr.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": bool(ds.bf16)},
        "fp16": {"enabled": bool(ds.fp16), "initial_scale_power": 12, "loss_scale_window": 100},
    }
    return _deep_merge(conf, ds.extra)


def clips_itself(cfg) -> bool:
    """True where the trainer, not DeepSpeed, must clip (ZeRO-0 without mixed precision)."""
    ds = cfg.deepspeed
    return ds.zero_stage == 0 and not (ds.bf16 or ds.fp16)


RESERVED_EXTRA = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "optimizer", "scheduler", "bf16", "fp16")


def check_extra(extra: dict, ep_size: int = 1, zero_stage: int = 0) -> Optional[str]:
    """A message for a ``deepspeed.extra`` entry moedist cannot honour, else None."""
    for key in RESERVED_EXTRA:
        if key in extra:
            return (f"deepspeed.extra.{key}: set by moedist from train.*/deepspeed.* "
                    "(micro_batch_size, grad_accum, lr, bf16, fp16); remove it")
    zero = extra.get("zero_optimization")
    if zero is not None and not isinstance(zero, dict):
        return "deepspeed.extra.zero_optimization: must be a mapping"
    zero = zero or {}
    if "stage" in zero:
        return "deepspeed.extra.zero_optimization.stage: use deepspeed.zero_stage"
    if ep_size > 1 and zero_stage in (1, 2) and zero.get("contiguous_gradients", True) is False:
        return ("deepspeed.extra.zero_optimization.contiguous_gradients=false: with parallel.ep_size > 1 "
                "DeepSpeed's ZeRO-1/2 fallback path then averages different experts' gradients; remove it")
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            return f"deepspeed.extra.zero_optimization.{key}: use deepspeed.{key}=none|cpu"
    return None


CPU_ADAM_CACHE = os.path.join("~", ".cache", "moedist", "torch_extensions")


def cpu_adam_problem() -> Optional[str]:
    """None when DeepSpeed's CPU Adam loads (JIT-built once, cached under ~/.cache/moedist), else why not.

    The first build compiles C++ (minutes on a small machine); later runs load the cached library.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(CPU_ADAM_CACHE))
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        builder = CPUAdamBuilder()
        if not builder.is_compatible(False):
            return "DeepSpeed's CPUAdamBuilder reports it is not compatible with this machine"
        builder.load(verbose=False)
    except Exception as err:  # noqa: BLE001 - compiler missing, build error, ...
        return " ".join(f"{type(err).__name__}: {err}".split())[:300]
    return None


def check_offload(cfg) -> Optional[str]:
    """A message for a ``deepspeed.offload_*`` setting that cannot run here (checked at preflight), else None."""
    ds = cfg.deepspeed
    if ds.offload_optimizer == "none":
        return None
    if ds.fp16 and not torch.cuda.is_available():
        return "deepspeed.fp16=true with deepspeed.offload_optimizer=cpu: DeepSpeed's fp16 needs a CUDA GPU"
    problem = cpu_adam_problem()
    if problem is not None:
        return (f"deepspeed.offload_optimizer=cpu: DeepSpeed's CPU Adam cannot be built or loaded here ({problem}); "
                "set deepspeed.offload_optimizer=none")
    return None


def build_offload_optimizer(param_groups: List[Dict[str, Any]], train_cfg) -> torch.optim.Optimizer:
    """DeepSpeed's CPU AdamW over `param_groups` (ZeRO-Offload steps the CPU fp32 partitions with it).

    Expert groups keep their ``moe``/``name`` keys, so the engine still reduces them over their EP groups.
    """
    cpu_adam_problem()  # sets TORCH_EXTENSIONS_DIR, loads the cached build
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(param_groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=1e-8,
                            weight_decay=train_cfg.weight_decay, adamw_mode=True)


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: Dict[str, Any]):
    """``deepspeed.initialize`` with a client optimizer; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


# ------------------------------------------------------------------ ZeRO-3 parameters

def local_param_numel(p: torch.Tensor) -> int:
    """Elements of `p` this rank stores (its ZeRO-3 partition, or the whole tensor)."""
    ds_tensor = getattr(p, "ds_tensor", None)
    return ds_tensor.numel() if ds_tensor is not None else p.numel()


@contextlib.contextmanager
def gathered(params, modifier_rank=None, enabled: bool = True):
    """Full ZeRO-3 parameters inside the block (a no-op for other stages)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not enabled or not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield
