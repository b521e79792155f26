"""Fold eval-mode BatchNorm into the layer before it (`repro bench --fuse-bn`, the LeViT
protocol): outputs unchanged up to rounding."""

from __future__ import annotations

import inspect
from collections import Counter

import timm
import torch
import torch.nn as nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _fuse_own(module: nn.Module, counts: Counter) -> None:
    """Replace children that know how to fold themselves (`fuse()`), as timm and LeViT do."""
    for name, child in module.named_children():
        fuse = getattr(child, "fuse", None)
        if callable(fuse) and not any(
                p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                for p in inspect.signature(fuse).parameters.values()):
            fused = fuse()
            if isinstance(fused, nn.Module):
                setattr(module, name, fused)
                counts[type(child).__name__] += 1
                child = fused
        _fuse_own(child, counts)


def _set(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _conv_bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where, in the traced graph, the conv's output feeds only that BN."""
    import torch.fx

    leaves = tuple(timm.layers.get_notrace_modules())

    class Tracer(torch.fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(
                f for f in timm.layers.get_notrace_functions() if callable(f)))

        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    graph = Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _BATCHNORMS:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        if _CONVS.get(type(modules[prev.target])) is not type(modules[node.target]):
            continue
        if calls[prev.target] == 1 and calls[node.target] == 1:  # modules used once only
            pairs.append((prev.target, node.target))
    return pairs


def _conv_bn_pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names adjacent in plain nn.Sequential containers (untraceable models)."""
    pairs = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward:
            continue
        kids = list(m.named_children())
        for (a, conv), (b, bn) in zip(kids, kids[1:], strict=False):
            if _CONVS.get(type(conv)) is type(bn):
                pairs.append((f"{name}.{a}" if name else a, f"{name}.{b}" if name else b))
    return pairs


def fuse_bn(model: nn.Module) -> dict:
    """Fold eval-mode BatchNorm into the layer before it, in place; returns what was folded.

    Every fold leaves the outputs unchanged (up to rounding): first the modules that fold
    themselves (`fuse()`: timm's LeViT ConvNorm/LinearNorm/NormLinear, as speed_test.py's
    replace_batchnorm does), then conv -> BatchNorm pairs found in the torch.fx graph (or, when
    the model cannot be traced, adjacent in an nn.Sequential). speed_test.py also turns leftover
    BatchNorm2d into Identity, which changes outputs; that is not done: they are counted instead.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    counts: Counter = Counter()
    with torch.no_grad():
        _fuse_own(model, counts)
    record: dict = {"fuse_methods": dict(counts), "conv_bn_pairs": 0, "pair_method": None}
    if any(isinstance(m, _BATCHNORMS) for m in model.modules()):
        try:
            pairs, record["pair_method"] = _conv_bn_pairs_fx(model), "torch.fx"
        except Exception as e:  # data-dependent control flow and the like
            pairs, record["pair_method"] = _conv_bn_pairs_sequential(model), "nn.Sequential"
            record["trace_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for conv_name, bn_name in pairs:
            bn = model.get_submodule(bn_name)
            if bn.running_mean is None:  # no running statistics: batch statistics at test time
                continue
            _set(model, conv_name, fuse_conv_bn_eval(model.get_submodule(conv_name), bn))
            _set(model, bn_name, nn.Identity())
            record["conv_bn_pairs"] += 1
    record["batchnorm_left"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                   for m in model.modules())
    return record
