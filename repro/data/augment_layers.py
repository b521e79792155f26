"""A policy's draws for a batch, one `Layer` per layer of ops, and their application.

timm's draws, per sample: RandAugment picks `n` ops uniformly with replacement (weighted without
replacement for `tweights`, as numpy's `choice` does), AutoAugment one sub-policy uniformly; each
op then applies with its probability, its magnitude gets Gaussian noise (`mstd`; uniform for
`mstd` > 100) and is clipped to [0, `mmax` or 10], and timm's level functions turn it into the
op's argument (with the random sign). Colour jitter is drawn as four such layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from repro.data.augment_ops import OPS, cpu_kernels, cpu_run
from repro.recipe.policy import LEVEL_DENOM, Policy


@dataclass
class Layer:
    """What one layer of the policy drew for a batch: per sample, the op (an index into
    `names`), whether it applies, its clipped magnitude and its argument."""

    names: tuple[str, ...]
    op: torch.Tensor  # int64, n
    applied: torch.Tensor  # bool, n
    magnitude: torch.Tensor  # float64, n (after noise and clipping)
    arg: torch.Tensor  # float64, n (the level function's output; 0 for argument-free ops)

    def __getitem__(self, part: slice) -> Layer:
        """These samples' draws."""
        return Layer(self.names, self.op[part], self.applied[part], self.magnitude[part],
                     self.arg[part])


def policy_layers(policy: Policy, n: int, generator: torch.Generator | None = None,
                  hparams: dict | None = None) -> list[Layer]:
    """Draw `policy`'s ops, application, magnitudes and arguments for n samples (on the CPU),
    as timm draws them (module doc)."""
    g = generator
    hp = hparams or {"translate_const": 100}
    L = policy.num_layers
    if policy.kind == "rand":
        if policy.weights is None:
            op = torch.randint(len(policy.names), (n, L), generator=g)
        else:
            w = torch.tensor(policy.weights, dtype=torch.float64).expand(n, -1)
            op = torch.multinomial(w, L, replacement=False, generator=g)
        prob = torch.full((n, L), policy.prob, dtype=torch.float64)
        mag = torch.full((n, L), float(policy.magnitude), dtype=torch.float64)
        names = policy.names
    else:
        sub = torch.randint(len(policy.sub_policies), (n,), generator=g)
        names = policy.names
        index = {name: i for i, name in enumerate(names)}
        table_op = torch.tensor([[index[o[0]] for o in s] for s in policy.sub_policies])
        table_p = torch.tensor([[o[1] for o in s] for s in policy.sub_policies],
                               dtype=torch.float64)
        table_m = torch.tensor([[float(o[2]) for o in s] for s in policy.sub_policies],
                               dtype=torch.float64)
        op, prob, mag = table_op[sub], table_p[sub], table_m[sub]
    # timm draws: random() > prob skips; gauss / uniform magnitude noise; random() > 0.5
    # negates. Drawn for every (sample, layer), used where they apply.
    u = torch.rand((n, L), generator=g, dtype=torch.float64)
    applied = ~((prob < 1.0) & (u > prob))
    if policy.magnitude_std == math.inf:
        mag = torch.rand((n, L), generator=g, dtype=torch.float64) * mag
    elif policy.magnitude_std > 0:
        mag = mag + policy.magnitude_std * torch.randn((n, L), generator=g,
                                                     dtype=torch.float64)
    mag = mag.clamp(0.0, policy.magnitude_max or LEVEL_DENOM)
    sign = torch.where(torch.rand((n, L), generator=g, dtype=torch.float64) > 0.5, -1.0, 1.0)
    layers = []
    for j in range(L):
        arg = torch.zeros(n, dtype=torch.float64)
        for k, name in enumerate(names):
            sel = op[:, j] == k
            level_fn = OPS[name].level_fn
            if sel.any() and level_fn is not None:
                arg[sel] = level_fn(mag[sel, j], sign[sel, j], hp)
        layers.append(Layer(names, op[:, j], applied[:, j], mag[:, j], arg))
    return layers


def apply_layers(images: torch.Tensor, layers: list[Layer], hp: dict) -> torch.Tensor:
    """Apply drawn layers to a uint8 N x 3 x H x W batch, in order.

    A CPU batch goes through the kernels of repro.data.augment_cpu image by image, all its ops
    in one call (augment_ops.cpu_run). Otherwise each op runs once per layer, as torch
    operations, on the samples it hit; the batch is held as N x H x W x 3 (channels_last
    memory), so that taking those samples and putting them back are whole-image copies."""
    if cpu_kernels(images, hp) is not None:
        return cpu_run(images, steps(layers), hp)
    x = images.permute(0, 2, 3, 1).contiguous().clone()  # our own copy, channels last
    n, h, w, c = x.shape
    rows = x.view(n, h * w * c)  # index_select over whole rows is a memcpy per image
    dev = x.device
    for layer in layers:
        for k, name in enumerate(layer.names):
            hit = torch.nonzero((layer.op == k) & layer.applied).flatten()
            if hit.numel() == 0:
                continue
            sub = rows.index_select(0, hit.to(dev)).view(-1, h, w, c).permute(0, 3, 1, 2)
            out = OPS[name].fn(sub, layer.arg[hit].to(dev), hp).permute(0, 2, 3, 1)
            for j, i in enumerate(hit.tolist()):  # (index_copy_ is elementwise here)
                x[i].copy_(out[j])
    return x.permute(0, 3, 1, 2)


def steps(layers: list[Layer]) -> list[tuple]:
    """Drawn layers as augment_ops.cpu_run takes them."""
    return [(x.names, x.op, x.applied, x.arg) for x in layers]


# Colour jitter, drawn as layers of the colour ops.

JITTER_OPS = ("Brightness", "Contrast", "Color")  # torchvision's fn_idx 0, 1, 2 (3, hue, off)


def jitter_layers(n: int, strength: float, generator: torch.Generator | None = None
                  ) -> list[Layer]:
    """torchvision's `ColorJitter(s, s, s)` as timm builds it from a scalar (no hue), drawn per
    sample as four layers: brightness, contrast and saturation factors uniform in
    [max(0, 1 - s), 1 + s], applied in a random order (layer k applies op order[k]; the fourth
    op, hue, is off). On PIL images those are ImageEnhance's Brightness / Contrast / Color, the
    ops of augment_ops."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    order = torch.rand((n, 4), generator=generator).argsort(dim=1)  # randperm(4) per sample
    factors = lo + (hi - lo) * torch.rand((n, 3), generator=generator, dtype=torch.float64)
    layers = []
    for k in range(4):
        op = order[:, k]
        arg = factors.gather(1, op.clamp(max=2)[:, None])[:, 0]
        layers.append(Layer(JITTER_OPS, op, op < 3, arg, arg))
    return layers

