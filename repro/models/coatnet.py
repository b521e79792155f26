"""CoAtNet-0..4 as the paper specifies them: "CoAtNet: Marrying Convolution and Attention for All
Data Sizes", Dai, Liu, Le, Tan (NeurIPS 2021), arXiv:2106.04803.

Built from timm's MaxxVit configuration machinery (`timm.models.maxxvit`), with the paper's
choices where timm's own `coatnet_N_224` differ (paper Table 3, Eq. 5 and Appendix A.1):
- MBConv down-sampling strides the first 1x1 convolution (Eq. 5: `stride_mode='1x1'`); timm's
  `coatnet_N_224` stride the depthwise convolution instead, the paper's Table 9 "Strided DConv"
  variant (+0.4 GFLOPs on CoAtNet-0). Those stay available under timm's names for comparison.
- Down-sampling pools (shortcut and transformer blocks) are 2x2 max pools, not timm's avg pools.
- Layout C-C-T-T, depths/widths of Table 3, MBConv expansion 4 with SE 0.25, attention head
  size 32, relative attention (timm's relative position bias), GELU, pre-norm (BN for MBConv, LN
  for attention/FFN).

Head: the paper says "global average pooling + FC" and never mentions a pre-logits layer, but
its parameter counts settle it. Counted on the meta device (all parameters, 224 px):
    model      with pre-logits     without        paper (Table 4/13/14)
    CoAtNet-0    25.04 M           24.45 M         25 M
    CoAtNet-1    42.23 M           41.64 M         42 M
    CoAtNet-2    74.68 M           73.64 M         75 M
    CoAtNet-3   166.97 M          164.61 M        168 M
    CoAtNet-4   275.43 M          273.06 M        275 M
Rounded, only the pre-logits variant gives the paper's 25/42/75/275 M (without it CoAtNet-0 would
print 24 M and CoAtNet-2 74 M); CoAtNet-3 is 168 M in the paper and 167 M (0.6 % low) with it,
165 M without. So the head is global average pool -> LayerNorm -> Linear(D4, D4) + tanh -> FC
(timm's NormMlpClassifierHead with hidden size D4), as in timm's paper-like configs. The
pre-logits layer adds no FLOPs that matter (< 0.1 %).

Test-size override: MaxxVit overlays keyword arguments on its config, so `depths=(1, 1, 1, 1)`
builds a shallower model without touching the paper's configuration.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.maxxvit import (
    MaxxVit,
    MaxxVitCfg,
    MaxxVitConvCfg,
    MaxxVitTransformerCfg,
    checkpoint_filter_fn,
)

SMALL = {"depths": (1, 1, 1, 1)}  # test size: one block per stage (see above)
# timm's own models the suite uses: the strided-depthwise variants (Table 9, "Strided DConv")
TIMM_MODELS = tuple(f"coatnet_{i}_224" for i in range(4))

__all__ = ["COATNET_CONFIGS", "coatnet_cfg"]

# Paper Table 3: (L, D) for S0 (stem), S1, S2 (MBConv), S3, S4 (relative-attention Transformer).
COATNET_CONFIGS = {
    0: ((2, 64), (2, 96), (3, 192), (5, 384), (2, 768)),
    1: ((2, 64), (2, 96), (6, 192), (14, 384), (2, 768)),
    2: ((2, 128), (2, 128), (6, 256), (14, 512), (2, 1024)),
    3: ((2, 192), (2, 192), (6, 384), (14, 768), (2, 1536)),
    4: ((2, 192), (2, 192), (12, 384), (28, 768), (2, 1536)),
}


def coatnet_cfg(size: int) -> MaxxVitCfg:
    """timm MaxxVitCfg for CoAtNet-`size` as the paper specifies it."""
    (_, stem), *stages = COATNET_CONFIGS[size]
    return MaxxVitCfg(
        embed_dim=tuple(d for _, d in stages),
        depths=tuple(n for n, _ in stages),
        block_type=("C", "C", "T", "T"),
        stem_width=stem,  # S0: two 3x3 convs, the first with stride 2
        conv_cfg=MaxxVitConvCfg(stride_mode="1x1", pool_type="max2",
                                downsample_pool_type="max2"),
        transformer_cfg=MaxxVitTransformerCfg(pool_type="max2", dim_head=32),
        head_hidden_size=stages[-1][1],
    )


def _cfg() -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv1", "classifier": "head.fc", "paper_ids": "arXiv:2106.04803",
    }


def _register(size: int):
    name = f"coatnet_{size}"

    def fn(pretrained: bool = False, **kwargs):
        return build_model_with_cfg(
            MaxxVit, name, pretrained, model_cfg=coatnet_cfg(size),
            feature_cfg=dict(flatten_sequential=True),
            pretrained_filter_fn=checkpoint_filter_fn, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"CoAtNet-{size} (paper Table 3, Eq. 5 down-sampling)."
    fn.__module__ = __name__
    globals()[name] = register_model(fn)


# The paper released no weights: timm's registry knows these configs as untrained.
default_cfgs = generate_default_cfgs({f"coatnet_{size}": _cfg() for size in COATNET_CONFIGS})

for _size in COATNET_CONFIGS:
    _register(_size)
