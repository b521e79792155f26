"""Optimizer, learning-rate schedule and loss from a recipe — timm's, configured explicitly."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler

from repro.recipe import Derived, Recipe


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """timm's factory. No weight decay on norms and biases (every tensor of one dimension or
    less, timm's `param_groups_weight_decay`) unless `optim.wd_norm_bias`; nor on what the
    model's `no_weight_decay()` names, unless `optim.wd_skip_model_list` is false."""
    o = recipe.optim
    name = o.name
    kwargs = {}
    if name in ("adamw", "adam", "lamb"):
        kwargs = {"betas": tuple(o.betas), "eps": o.eps}
    elif name == "sgd":
        name = "sgd" if o.nesterov else "momentum"  # timm's "sgd" means Nesterov
    params = model
    if not o.wd_norm_bias and not o.wd_skip_model_list:
        params = param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=())
    return create_optimizer_v2(params, opt=name, lr=lr, weight_decay=o.weight_decay,
                               momentum=o.momentum, filter_bias_and_bn=not o.wd_norm_bias,
                               **kwargs)


def build_scheduler(optimizer, recipe: Recipe, d: Derived):
    """A per-step schedule over the recipe's full length (a truncated run stops early)."""
    s = recipe.schedule
    cooldown = s.cooldown_epochs * d.steps_per_epoch
    t = max(1, d.total_steps - cooldown)
    common = dict(warmup_t=d.warmup_steps, warmup_lr_init=d.warmup_lr, t_in_epochs=False)
    if s.name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=t, lr_min=d.min_lr, **common)
    if s.name == "linear":
        return PolyLRScheduler(optimizer, t_initial=t, power=1.0, lr_min=d.min_lr, **common)
    return StepLRScheduler(optimizer, decay_t=t, decay_rate=1.0, warmup_prefix=False, **common)


def build_mixup(recipe: Recipe, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (it also applies label smoothing to the mixed targets)."""
    a = recipe.aug
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                 switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                 label_smoothing=recipe.train.label_smoothing, num_classes=num_classes)


def build_base_loss(recipe: Recipe, mixup: Mixup | None) -> nn.Module:
    """timm's train.py choice of loss: with Mixup the targets arrive mixed and smoothed
    (SoftTargetCrossEntropy, or BinaryCrossEntropy on them); without, label smoothing is the
    loss's own. One difference, on purpose: timm falls back to plain cross-entropy for
    `--bce-loss` without smoothing or Mixup; here `train.loss: sigmoid` is always a sigmoid
    loss, so the key is never silently dropped."""
    if recipe.train.loss == "sigmoid":
        return BinaryCrossEntropy(smoothing=0.0 if mixup is not None else
                                  recipe.train.label_smoothing)
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if recipe.train.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(recipe.train.label_smoothing)
    return nn.CrossEntropyLoss()


class DistillationLoss(nn.Module):
    """DeiT/LeViT distillation: the class head learns the labels, the distillation head the
    teacher (hard: its argmax; soft: its temperature-softened distribution)."""

    def __init__(self, base: nn.Module, teacher: nn.Module | None, kind: str, alpha: float,
                 tau: float):
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, inputs, outputs, targets):
        outputs_kd = None
        if isinstance(outputs, tuple):
            outputs, outputs_kd = outputs
        base = self.base(outputs, targets)
        if self.kind == "none":
            return base
        if outputs_kd is None:  # a model without a distillation head distils through its one
            outputs_kd = outputs
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
        if self.kind == "soft":
            t = self.tau
            kd = F.kl_div(F.log_softmax(outputs_kd / t, dim=1),
                          F.log_softmax(teacher_out / t, dim=1),
                          reduction="sum", log_target=True) * (t * t) / outputs_kd.numel()
        else:
            kd = F.cross_entropy(outputs_kd, teacher_out.argmax(dim=1))
        return base * (1 - self.alpha) + kd * self.alpha
