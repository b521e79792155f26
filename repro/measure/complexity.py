"""Parameters and multiply-adds of a model, counted without memory or compute.

The model is built on PyTorch's meta device (shapes only) and run once, batch 1, eval mode,
under `torch.utils.flop_counter.FlopCounterMode`. On the meta device fused attention
(`scaled_dot_product_attention`) is decomposed and counted; on real CPU tensors the counter
misses it (pytorch#195460, ../shared/STYLE.md item 7), so a real-tensor count must switch fused
attention off to agree — `count_real` does, and the tests hold the two equal.
The papers' "FLOPs" are multiply-adds: GMACs = counted FLOPs / 2 / 1e9.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from repro import models

__all__ = ["Complexity", "count", "count_model", "count_real", "disable_fused_attention"]


@dataclass(frozen=True)
class Complexity:
    """What was counted, and how."""

    model: str
    resolution: int
    params: int  # all parameters, head included, as the papers count them
    flops: int  # as counted by FlopCounterMode (a multiply-add is 2)
    device: str  # "meta" or "cpu"

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.flops / 2 / 1e9


def count_model(model: torch.nn.Module, resolution: int, name: str = "") -> Complexity:
    """Count an existing model (meta or real) on a batch-1 input of its device."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    x = torch.empty(1, 3, resolution, resolution, device=p.device, dtype=p.dtype)
    if p.device.type != "meta":
        x.normal_()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    params = sum(t.numel() for t in model.parameters())
    return Complexity(name, resolution, params, counter.get_total_flops(), p.device.type)


@cache
def count(name: str, resolution: int = 224, num_classes: int = 1000) -> Complexity:
    """Params and FLOPs of timm model `name` at `resolution`, on the meta device."""
    with torch.device("meta"):
        model = models.create(name, resolution, num_classes=num_classes)
    return count_model(model, resolution, name)


def disable_fused_attention(model: torch.nn.Module) -> int:
    """Switch timm attention modules to explicit matmuls; returns how many were switched."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and m.fused_attn:
            m.fused_attn = False
            n += 1
    return n


def count_real(name: str, resolution: int = 224, fused: bool = False, **kwargs) -> Complexity:
    """The same count on real CPU tensors (slow; for cross-checks), fused attention off."""
    model = models.create(name, resolution, **kwargs)
    if not fused:
        disable_fused_attention(model)
    return count_model(model, resolution, name)
