"""One micro-batch of token sequences, as the trainer and the model take it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

IGNORE = -100  # label id that is never counted in the loss (the PyTorch / Hugging Face convention)


@dataclass
class Batch:
    """input_ids/labels [B, S] int64; labels == IGNORE are not counted.

    position_ids [B, S]: rotary positions (None = 0..S-1 in every row).
    segment_ids [B, S]: packed documents; a token attends only to earlier tokens of
    the same segment (None = one document per row, plain causal attention).
    domain_ids [B]: index of each row's data source in data.sources (rows never mix sources:
    each source is packed on its own); picks the MoE expert group (None = no domain).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: Optional[torch.Tensor] = None
    segment_ids: Optional[torch.Tensor] = None
    domain_ids: Optional[torch.Tensor] = None

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device))
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.segment_ids),
                     move(self.domain_ids))

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())
