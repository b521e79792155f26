"""EarlyConv ViT_P / ViT_C: "Early Convolutions Help Transformers See Better".

Xiao, Singh, Mintun, Darrell, Dollár, Girshick (NeurIPS 2021), arXiv:2106.14881.
Official configs: facebookresearch/pycls, branch `vitconfigs` (configs/vitconv_baselines/vit/).

ViT_P is the plain ViT with a 16x16 patchify stem. ViT_C replaces that stem by stacked 3x3
convolutions (BatchNorm + ReLU after each, no bias) and a final 1x1 convolution to the width (no
norm or activation), and removes one transformer block to keep the FLOPs (paper Table 1, Sec. 3
"Convolutional stem details"). Both are timm's VisionTransformer (cls token, learned position
embedding, pre-norm blocks, final LayerNorm, linear head); the stem is a timm `HybridEmbed`.

Checked against pycls's own parameter counts: ViT_C-18GF has exactly 81,573,160 parameters and
ViT_P-18GF 86,567,656 (../shared/papers/NOTES.md).

72GF (paper Appendix C; ImageNet-21k only): built as the pycls configs
configs/vitconv_baselines/vit/IN21k_ViT-{P,C}-72GF_adamw_128gpus.yaml (vitconfigs@206d0db) have it.
ViT_P-72GF: width 1152, 18 heads, MLP 4608, 22 blocks; paper and config agree. ViT_C-72GF: the
config's own stem of nine convs, 3x3 64-128-128-256-256-256-512-512 with strides 2,2,1,2,1,1,2,1
(BN + ReLU) and a 1x1 conv to 1152, then 21 blocks (one removed, as for every ViT_C). The paper
text disagrees: "For ViTC-72GF, we use the same C-stem design used for ViTC-18GF and ViTC-36GF,
but without removing one transformer block" (Appendix C), i.e. the six-conv 18GF stem and 22
blocks; it also initialises that stem from the ImageNet-21k ViT_C-36GF and freezes it, which fits
the paper's stem (all but its 1x1 conv) and not the config's. Which of the two produced the
paper's 86.4 / 87.4 is unconfirmed, but the counts lean to the text: the config's model has
341.96 M parameters and 70.44 / 216.95 GMACs at 224 / 384; the text's (18GF stem with its 1x1
conv to 1152, 22 blocks) 354.95 M and 72.74 / 224.19 GMACs, where Appendix C prints 224GF at 384.

Deviation: weight initialisation is timm's ViT scheme, not pycls's (which initialises the conv
stem with He-normal and the head with zeros); it changes no architecture number.
Test-size override: `depth=N` (a timm VisionTransformer keyword) builds a shallower model.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

SMALL = {"depth": 2}  # test size: two transformer blocks (see above)

__all__ = ["ConvStem", "EARLYCONV_CONFIGS"]

# Paper Table 1 (width, MLP width, heads, blocks) and the conv stems of Sec. 3 / pycls configs:
# stem = (kernels, strides, channels); the last entry is the 1x1 conv to the width.
_STEM_SMALL = ((3, 3, 3, 3, 1), (2, 2, 2, 2, 1))
_STEM_LARGE = ((3, 3, 3, 3, 3, 3, 1), (2, 2, 1, 2, 1, 2, 1))
EARLYCONV_CONFIGS = {
    "1gf": dict(embed_dim=192, mlp_dim=576, num_heads=3, depth=12,
                stem=(*_STEM_SMALL, (24, 48, 96, 192, 192))),
    "4gf": dict(embed_dim=384, mlp_dim=1152, num_heads=6, depth=12,
                stem=(*_STEM_SMALL, (48, 96, 192, 384, 384))),
    "18gf": dict(embed_dim=768, mlp_dim=3072, num_heads=12, depth=12,
                 stem=(*_STEM_LARGE, (64, 128, 128, 256, 256, 512, 768))),
    # 36GF keeps the 18GF stem, widened only in its last (1x1) conv.
    "36gf": dict(embed_dim=1024, mlp_dim=4096, num_heads=16, depth=14,
                 stem=(*_STEM_LARGE, (64, 128, 128, 256, 256, 512, 1024))),
    # Appendix C / the pycls IN21k 72GF configs: ViT_C's stem is the config's nine convs (the
    # paper text says the 18GF stem and 22 blocks; module docstring).
    "72gf": dict(embed_dim=1152, mlp_dim=4608, num_heads=18, depth=22,
                 stem=((3, 3, 3, 3, 3, 3, 3, 3, 1), (2, 2, 1, 2, 1, 1, 2, 1, 1),
                       (64, 128, 128, 256, 256, 256, 512, 512, 1152))),
}

# Not a paper row: a scaled-down ViT_C (same design — 3x3 conv-BN-ReLU stem, 1x1 conv to the
# width, one block fewer than its ViT_P twin would have) for 32 px images, so the quickstart and
# the tests train a real member of the family on a CPU in minutes. ~0.5 M parameters.
SCALED_DOWN = {
    "nano": dict(embed_dim=96, mlp_dim=288, num_heads=3, depth=5,
                 stem=((3, 3, 1), (2, 2, 1), (24, 48, 96))),
}


class ConvStem(nn.Sequential):
    """3x3 conv-BN-ReLU layers (the stem's body; the final 1x1 conv is HybridEmbed's `proj`)."""

    def __init__(self, kernels, strides, channels, in_chans: int = 3, device=None, dtype=None):
        layers = []
        for k, s, c in zip(kernels, strides, channels, strict=True):
            layers.append(nn.Sequential(
                nn.Conv2d(in_chans, c, k, stride=s, padding=k // 2, bias=False, device=device,
                          dtype=dtype),
                nn.BatchNorm2d(c, device=device, dtype=dtype),
                nn.ReLU(inplace=True),
            ))
            in_chans = c
        super().__init__(*layers)
        self.num_features = in_chans  # read by HybridEmbed


def _conv_stem_embed(kernels, strides, channels, *, img_size, in_chans, embed_dim, bias=True,
                     device=None, dtype=None, **_vit_patch_args):
    """A VisionTransformer `embed_layer`: the conv body, then a biased 1x1 conv to the width."""
    *body_k, last_k = kernels
    *body_s, last_s = strides
    assert (last_k, last_s) == (1, 1), "the stem ends in a 1x1, stride-1 conv"
    reduction = 1
    for s in body_s:
        reduction *= s
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    backbone = ConvStem(body_k, body_s, channels[:-1], in_chans, device=device, dtype=dtype)
    return HybridEmbed(backbone, img_size=size, patch_size=1,
                       feature_size=(size[0] // reduction, size[1] // reduction),
                       feature_ratio=reduction, in_chans=in_chans, embed_dim=embed_dim,
                       bias=bias, device=device, dtype=dtype)


def _cfg() -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        # pycls tests at 224 after resizing to 256: crop_pct 224/256.
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head",
        "paper_ids": "arXiv:2106.14881", "license": "apache-2.0",
    }


def _create(variant: str, size: str, conv: bool, pretrained: bool, **kwargs):
    cfg = dict({**EARLYCONV_CONFIGS, **SCALED_DOWN}[size])
    kernels, strides, channels = cfg.pop("stem")
    mlp_dim = cfg.pop("mlp_dim")
    args = dict(patch_size=16, mlp_ratio=mlp_dim / cfg["embed_dim"], **cfg)
    if conv:
        args["depth"] -= 1  # ViT_C drops one block to pay for its stem (Table 1)
        args["embed_layer"] = partial(_conv_stem_embed, kernels, strides, channels)
        if kwargs.get("embed_dim", args["embed_dim"]) != channels[-1]:
            raise ValueError(f"{variant}: the conv stem ends at width {channels[-1]}")
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **args)


def _register(size: str, conv: bool):
    name = f"vit_{'c' if conv else 'p'}_{size}"
    where = "Appendix C and the pycls IN21k config" if size == "72gf" else "Table 1"
    label = f"ViT_{'C' if conv else 'P'}-{size[:-2].upper()}GF (EarlyConv paper {where})" \
        if size in EARLYCONV_CONFIGS else "Scaled-down ViT_C for 32 px (not a paper row)"

    def fn(pretrained: bool = False, **kwargs):
        return _create(name, size, conv, pretrained, **kwargs)

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = f"{label}."
    fn.__module__ = __name__
    globals()[name] = register_model(fn)


# No weights are published for these configs: timm's registry knows them as untrained.
default_cfgs = generate_default_cfgs({
    **{f"vit_{k}_{size}": _cfg() for size in EARLYCONV_CONFIGS for k in "pc"},
    "vit_c_nano": {**_cfg(), "input_size": (3, 32, 32), "crop_pct": 1.0},
})

for _size in EARLYCONV_CONFIGS:
    _register(_size, conv=False)
    _register(_size, conv=True)
_register("nano", conv=True)
