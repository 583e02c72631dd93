"""One object that owns every process-group dimension (torchtitan style).

    world = edp x ep        (expert weights)
    world = dp              (everything else: attention, router, shared experts, embeddings)

Layout (the same as DeepSpeed's default, so its groups can be reused):

* EP groups are consecutive ranks: [0..ep-1], [ep..2ep-1], ... Tokens travel by
  all-to-all inside one EP group; rank r holds experts
  `[ep_rank * L, (ep_rank + 1) * L)` with `ep_rank = r % ep` and L = E / ep.
* EDP (expert-data-parallel) groups are strided: [0, ep, 2ep, ...], [1, ep+1, ...], ...
  They join the ranks that hold the same experts; expert gradients are reduced here.

Example, world 8, ep 4: EP [0,1,2,3] [4,5,6,7]; EDP [0,4] [1,5] [2,6] [3,7].

The rank lists are pure methods; `build()` creates the torch.distributed groups.
A dimension of size 1 still gets a real (singleton) group, and a dimension equal to
the world reuses the world group, so `dims.edp_group` is never a `None` that
torch.distributed would silently read as "the whole world".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from moedist.distributed.comm import ExpertParallelComm


@dataclass
class ParallelDims:
    """Expert-parallel layout of `world_size` ranks, seen from `rank`.

    Args:
        world_size: number of processes.
        ep_size: expert-parallel size; must divide `world_size`.
        rank: this process's global rank.

    Raises:
        ValueError: if a size is < 1, `rank` is out of range, or `ep_size` does not
            divide `world_size`.
    """

    world_size: int
    ep_size: int
    rank: int
    # Filled by build() / adopt().
    _ep_group: Any = field(default=None, init=False, repr=False, compare=False)
    _edp_group: Any = field(default=None, init=False, repr=False, compare=False)
    _world_group: Any = field(default=None, init=False, repr=False, compare=False)
    _ep_comm: Optional[ExpertParallelComm] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be >= 1")
        if self.ep_size < 1:
            raise ValueError(f"ep_size={self.ep_size} must be >= 1")
        if self.world_size % self.ep_size != 0:
            allowed = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
            raise ValueError(f"ep_size={self.ep_size} must divide world_size={self.world_size} "
                             f"(allowed ep_size: {allowed})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in 0..{self.world_size - 1} (world_size={self.world_size})")

    # ---- sizes and ranks (pure) -------------------------------------------------

    @property
    def dp_size(self) -> int:
        """Data-parallel size of non-expert weights: the whole world."""
        return self.world_size

    @property
    def edp_size(self) -> int:
        """Number of replicas of each expert (= number of EP groups)."""
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        """Position of this rank inside its EP group (selects its experts)."""
        return self.rank % self.ep_size

    @property
    def edp_rank(self) -> int:
        """Position of this rank inside its EDP group (= index of its EP group)."""
        return self.rank // self.ep_size

    @property
    def ep_group_name(self) -> str:
        """DeepSpeed's name for this EP size (`param.group_name`, group dictionary key)."""
        return f"ep_size_{self.ep_size}"

    def ep_group_ranks(self) -> List[List[int]]:
        """All EP groups, consecutive ranks: [[0..ep-1], [ep..2ep-1], ...]."""
        ep = self.ep_size
        return [list(range(g * ep, (g + 1) * ep)) for g in range(self.edp_size)]

    def edp_group_ranks(self) -> List[List[int]]:
        """All EDP groups, strided: [[0, ep, 2ep, ...], [1, ep+1, ...], ...]."""
        return [list(range(i, self.world_size, self.ep_size)) for i in range(self.ep_size)]

    @property
    def my_ep_ranks(self) -> List[int]:
        return self.ep_group_ranks()[self.edp_rank]

    @property
    def my_edp_ranks(self) -> List[int]:
        return self.edp_group_ranks()[self.ep_rank]

    def validate_experts(self, num_experts: int) -> int:
        """Check that the experts split evenly over EP; return the local count L.

        Raises:
            ValueError: if `num_experts` < 1 or not divisible by `ep_size`.
        """
        if num_experts < 1 or num_experts % self.ep_size != 0:
            raise ValueError(f"num_experts={num_experts} must be a positive multiple of ep_size={self.ep_size}")
        return num_experts // self.ep_size

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds."""
        n_local = self.validate_experts(num_experts)
        return range(self.ep_rank * n_local, (self.ep_rank + 1) * n_local)

    # ---- process groups ---------------------------------------------------------

    def build(self) -> "ParallelDims":
        """Create the EP and EDP groups; returns self.

        Collective: every rank must call it, with the same sizes. Each rank calls
        `new_group` for every group, EP groups first, then EDP groups, in rank-list
        order, as torch.distributed requires.

        Raises:
            ValueError: if torch.distributed is not initialised or its world size or
                rank differ from this object's.
        """
        import torch.distributed as dist

        self._check_world(dist)
        world = dist.group.WORLD
        self._world_group = world
        self._ep_group = self._new_groups(dist, self.ep_group_ranks())
        self._edp_group = self._new_groups(dist, self.edp_group_ranks())
        self._ep_comm = ExpertParallelComm(self._ep_group) if self.ep_size > 1 else ExpertParallelComm.single()
        return self

    def _new_groups(self, dist, groups: List[List[int]]):
        if len(groups) == 1:  # the group is the whole world: no new communicator
            return dist.group.WORLD
        mine = None
        for ranks in groups:
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    def _check_world(self, dist) -> None:
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; call moedist.distributed.init_distributed() first")
        if (dist.get_world_size(), dist.get_rank()) != (self.world_size, self.rank):
            raise ValueError(f"ParallelDims(world_size={self.world_size}, rank={self.rank}) does not match the "
                             f"process group (world_size={dist.get_world_size()}, rank={dist.get_rank()})")

    @classmethod
    def adopt(cls, ep_group, edp_group) -> "ParallelDims":
        """Use process groups created elsewhere (DeepSpeed's, see `train/deepspeed_setup.py`) instead
        of creating our own, so that the all-to-all and the engine's expert-gradient reduction run over
        the same ranks. Call after torch.distributed is initialised; the EP size is the EP group's size.
        """
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; call moedist.distributed.init_distributed() first")
        ep_size = dist.get_world_size(ep_group)
        dims = cls(world_size=dist.get_world_size(), ep_size=ep_size, rank=dist.get_rank())
        dims._world_group = dist.group.WORLD
        dims._ep_group, dims._edp_group = ep_group, edp_group
        dims._ep_comm = ExpertParallelComm(ep_group) if ep_size > 1 else ExpertParallelComm.single()
        return dims

    @property
    def is_built(self) -> bool:
        return self._world_group is not None

    def _built(self, value):
        if not self.is_built:
            raise ValueError("ParallelDims groups are not created yet; call .build() (or adopt) first")
        return value

    @property
    def world_group(self):
        """The default (world) process group: non-expert gradients are averaged here."""
        return self._built(self._world_group)

    @property
    def ep_group(self):
        """This rank's EP group (all-to-all of tokens)."""
        return self._built(self._ep_group)

    @property
    def edp_group(self):
        """This rank's EDP group (expert gradient reduction)."""
        return self._built(self._edp_group)

    @property
    def ep_comm(self) -> ExpertParallelComm:
        """Communicator handed to the MoE layers; `ExpertParallelComm.single()` at ep_size 1."""
        return self._built(self._ep_comm)
