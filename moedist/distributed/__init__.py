"""Process groups, collectives and launch environment (the only place that builds groups).

    env = init_distributed()                                   # any launcher, or one process
    dims = ParallelDims(env.world_size, ep_size=2, rank=env.rank).build()
    model = build_model(comm=dims.ep_comm)                      # layers get the EP communicator
    loss.backward(); sync_gradients(model, dims); clip_grad_norm_(model, 1.0, dims)
"""
from moedist.distributed.comm import ExpertParallelComm
from moedist.distributed.grad_sync import clip_grad_norm_, is_expert_param, mark_expert_param, sync_gradients
from moedist.distributed.launch_env import DistEnv, detect_launch_env, expand_nodelist, init_distributed
from moedist.distributed.parallel_dims import ParallelDims

__all__ = [
    "DistEnv",
    "ExpertParallelComm",
    "ParallelDims",
    "clip_grad_norm_",
    "detect_launch_env",
    "expand_nodelist",
    "init_distributed",
    "is_expert_param",
    "mark_expert_param",
    "sync_gradients",
]
