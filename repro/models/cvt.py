"""CvT: "CvT: Introducing Convolutions to Vision Transformers".

Wu, Xiao, Codella, Liu, Dai, Yuan, Zhang (ICCV 2021), arXiv:2103.15808.
Official code: microsoft/CvT (`lib/models/cls_cvt.py`, configs
`experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml`, `cvt-w24-384x384.yaml`), commit f851e68.

Three stages (paper Table 2). Each opens with a convolutional token embedding (kernel 7/3/3,
stride 4/2/2, padding 2/1/1, then LayerNorm) and stacks pre-norm transformer blocks whose q/k/v
come from a convolutional projection: depthwise 3x3 conv + BatchNorm (`dw_bn`; stride 1 for q,
2 for k/v), then a linear layer. No position embedding. Only the last stage has a cls token; it
skips the conv projection and is concatenated back before the linear q/k/v projections. The
classifier is LayerNorm on the cls token and a linear head.

Parameter names equal the official checkpoints' (`stage{i}.patch_embed.proj`,
`stage{i}.blocks.{j}.attn.conv_proj_q.conv`, `...attn.proj_q`, `stage2.cls_token`, `norm`, `head`,
...), so the released weights load with `load_state_dict(strict=True)`, e.g.
`timm.create_model("cvt_13", checkpoint_path=PATH)`. No weights are downloaded: `pretrained=True`
is an error.

Sizes (meta device; GMACs = torch.utils.flop_counter / 2, attention matmuls included) vs. Table 2:
CvT-13 19,997,480 params / 4.566 GMACs (19.98M / 4.53G), CvT-21 31,622,696 / 7.178 (31.54M /
7.13G), CvT-W24 277,196,392 / 60.917 (276.7M / 60.86G). The parameter counts equal those of the
official module built from its configs; Table 2's are 0.1-0.3 % lower for a reason the code does
not show.

Followed from the official code where the paper is silent (all of it changes numerics, none of it
changes a parameter count): qkv bias on; the attention scale is `dim ** -0.5` over the whole stage
width, not per head; the activation is QuickGELU (`x * sigmoid(1.702 x)`, set by the official
`get_cls_model`); init is trunc-normal(0.02) for every Linear with zero bias, ones/zeros for
LayerNorm and BatchNorm, trunc-normal(0.02) for the cls token and the head weight, and PyTorch's
defaults for the convolutions and the head bias. Stochastic depth: only stage 3 drops, its rate
rising linearly from 0 to `drop_path_rate` over its blocks (0.1 for CvT-13/21, 0.3 for W24).
As in the official model, the last block's `attn.conv_proj_q` (4,224 parameters in CvT-13) never
reaches the logits: they read only the cls token, whose query skips the conv projection, so those
parameters get zero gradient. They are kept so that the official weights load strictly.

Deviations (none changes the function computed or the state dict):
- LayerNorm is plain `nn.LayerNorm`; the official subclass casts to fp32, which autocast does
  for LayerNorm anyway.
- Attention runs through `F.scaled_dot_product_attention` (same maths, fused where available).
- `forward_features` applies the final LayerNorm to every token of the last stage (timm's
  convention: it returns the normalised token sequence, cls first); the official code normalises
  only the cls token. LayerNorm is per token, so the logits are identical. The official
  `torch.squeeze` of the cls token, which also drops a batch of size 1, is not reproduced.
- `pretrained_cfg["input_size"]` is 224 for all three, the resolution of paper Table 2; the
  released CvT-W24 weights are for 384 (set the resolution in the recipe).

Test-size override: every architecture keyword of `CvT` may be passed to `timm.create_model` and
replaces the paper value, e.g. `timm.create_model("cvt_13", depths=(1, 1, 1))` for a tiny model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, QuickGELU, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

SMALL = {"depths": (1, 1, 1)}  # test size: one block per stage (see above)

__all__ = ["CvT", "CVT_CONFIGS"]

# Paper Table 2 and the official MODEL.SPEC of each config; drop_path_rate is stage 3's rate.
CVT_CONFIGS = {
    "cvt_13": dict(
        embed_dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 2, 10), drop_path_rate=0.1
    ),
    "cvt_21": dict(
        embed_dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 4, 16), drop_path_rate=0.1
    ),
    "cvt_w24": dict(
        embed_dims=(192, 768, 1024), num_heads=(3, 12, 16), depths=(2, 2, 20), drop_path_rate=0.3
    ),
}


class ConvEmbed(nn.Module):
    """Convolutional token embedding: strided conv, then LayerNorm over channels per token."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


def _dw_bn(dim: int, stride: int) -> nn.Sequential:
    """The `dw_bn` convolutional projection: depthwise 3x3 conv (no bias) + BatchNorm."""
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)),
                ("bn", nn.BatchNorm2d(dim)),
            ]
        )
    )


class ConvAttention(nn.Module):
    """Multi-head attention whose q/k/v come from a conv projection followed by a linear one."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, stride_kv: int = 2,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, has_cls_token: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = dim**-0.5  # official code: the whole width, not the head dim
        self.has_cls_token = has_cls_token
        self.attn_drop = attn_drop
        # q keeps the resolution (stride 1) so the residual adds up; k/v are subsampled.
        self.conv_proj_q = _dw_bn(dim, 1)
        self.conv_proj_k = _dw_bn(dim, stride_kv)
        self.conv_proj_v = _dw_bn(dim, stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.reshape(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, t, c = x.shape
        if self.has_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        grid = x.transpose(1, 2).reshape(b, c, h, w)
        q, k, v = (
            conv(grid).flatten(2).transpose(1, 2)
            for conv in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)
        )
        if self.has_cls_token:
            q, k, v = (torch.cat((cls_token, y), dim=1) for y in (q, k, v))
        q, k, v = (
            self._heads(proj(y))
            for proj, y in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v))
        )
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        x = x.transpose(1, 2).reshape(b, t, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block with convolutional attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 has_cls_token: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            has_cls_token=has_cls_token,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=QuickGELU, drop=drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """Conv token embedding, optional cls token, then `depth` blocks."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        patch_stride: int,
        patch_padding: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rates: Sequence[float],
        has_cls_token: bool,
    ):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if has_cls_token else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    dpr,
                    has_cls_token,
                )
                for dpr in drop_path_rates
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """NCHW in; NCHW grid tokens and the (B, 1, C) cls token (or None) out."""
        x, h, w = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, h, w, use_reentrant=False)
            else:
                x = blk(x, h, w)
        cls_token = None
        if self.cls_token is not None:
            cls_token, x = x[:, :1], x[:, 1:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w), cls_token


def _stage_drop_path_rates(drop_path_rate: float | Sequence[float], depths: Sequence[int]):
    """Per-block rates: a float is the last stage's rate (earlier stages get 0, as in the paper's
    configs); a sequence gives each stage's rate. Within a stage the rate rises linearly from 0."""
    if isinstance(drop_path_rate, (int, float)):
        rates = [0.0] * (len(depths) - 1) + [float(drop_path_rate)]
    else:
        rates = [float(r) for r in drop_path_rate]
        if len(rates) != len(depths):
            raise ValueError(f"drop_path_rate has {len(rates)} entries for {len(depths)} stages")
    # float32 linspace on the CPU, as the official code (also under a meta-device context)
    return [
        torch.linspace(0, r, d, device="cpu").tolist() for r, d in zip(rates, depths, strict=True)
    ]


class CvT(nn.Module):
    """Convolutional vision Transformer; the keywords are the paper's Table 2 columns."""

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 192, 384),
        num_heads: Sequence[int] = (1, 3, 6),
        depths: Sequence[int] = (1, 2, 10),
        patch_sizes: Sequence[int] = (7, 3, 3),
        patch_strides: Sequence[int] = (4, 2, 2),
        patch_paddings: Sequence[int] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float | Sequence[float] = 0.1,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
    ):
        """`drop_rate` is the official DROP_RATE (dropout after the embedding, in the MLP and
        after the attention projection), not timm's pre-head dropout; 0 in every paper config."""
        super().__init__()
        n = len(depths)
        for name, seq in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("patch_sizes", patch_sizes),
            ("patch_strides", patch_strides),
            ("patch_paddings", patch_paddings),
        ):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} stages")
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_stages = n
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dims[-1]
        self.feature_info = []
        dprs = _stage_drop_path_rates(drop_path_rate, depths)
        reduction = 1
        for i in range(n):
            stage = CvTStage(
                in_chans if i == 0 else embed_dims[i - 1],
                embed_dims[i],
                depths[i],
                num_heads[i],
                patch_sizes[i],
                patch_strides[i],
                patch_paddings[i],
                mlp_ratio,
                qkv_bias,
                drop_rate,
                attn_drop_rate,
                dprs[i],
                has_cls_token=(i == n - 1),
            )
            setattr(self, f"stage{i}", stage)  # official names: stage0, stage1, stage2
            reduction *= patch_strides[i]
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=reduction, module=f"stage{i}")
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @staticmethod
    def _check_pool(global_pool: str):
        if global_pool != "token":
            raise ValueError(
                f"CvT classifies from its cls token; global_pool={global_pool!r} "
                "is not supported (only 'token')"
            )

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.get_submodule(f"stage{self.num_stages - 1}").cls_token, std=0.02)
        self._reset_head()

    def _reset_head(self):
        # Official: only the head weight is re-initialised; its bias keeps nn.Linear's default.
        if isinstance(self.head, nn.Linear):
            self.head.reset_parameters()
            trunc_normal_(self.head.weight, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stage{self.num_stages - 1}.cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stage0\.patch_embed",
            blocks=r"^stage(\d+)"
            if coarse
            else [
                (r"^stage(\d+)\.(?:patch_embed|cls_token)", None),
                (r"^stage(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for i in range(self.num_stages):
            self.get_submodule(f"stage{i}").grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        if global_pool is not None:
            self._check_pool(global_pool)
        self.num_classes = num_classes
        device = self.norm.weight.device
        self.head = (
            nn.Linear(self.num_features, num_classes, device=device)
            if num_classes > 0
            else nn.Identity()
        )
        self._reset_head()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in; the last stage's normalised tokens (B, 1 + H*W, C), cls token first."""
        cls_token = None
        for i in range(self.num_stages):
            x, cls_token = self.get_submodule(f"stage{i}")(x)
        x = torch.cat((cls_token, x.flatten(2).transpose(1, 2)), dim=1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=None,
        crop_pct=0.875,
        interpolation="bicubic",
        fixed_input_size=False,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stage0.patch_embed.proj",
        classifier="head",
        license="mit",
        paper_ids="arXiv:2103.15808",
        **kwargs,
    )


default_cfgs = generate_default_cfgs({name: _cfg() for name in CVT_CONFIGS})


def _create_cvt(variant: str, pretrained: bool = False, **kwargs) -> CvT:
    if pretrained:
        raise ValueError(
            f"{variant}: repro downloads no weights. Build with pretrained=False and load a local "
            "official checkpoint: timm.create_model(name, checkpoint_path=PATH) or "
            "model.load_state_dict(torch.load(PATH, map_location='cpu'))"
        )
    if kwargs.get("features_only"):
        raise ValueError(f"{variant}: features_only is not supported")
    model_args = {**CVT_CONFIGS[variant], **kwargs}  # caller's keywords replace the paper's
    return build_model_with_cfg(CvT, variant, pretrained=False, **model_args)


@register_model
def cvt_13(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-13: 19.98M params, 4.53G FLOPs at 224 (paper Table 2)."""
    return _create_cvt("cvt_13", pretrained, **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-21: 31.54M params, 7.13G FLOPs at 224 (paper Table 2)."""
    return _create_cvt("cvt_21", pretrained, **kwargs)


@register_model
def cvt_w24(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-W24: 276.7M params, 60.86G FLOPs at 224 (paper Table 2)."""
    return _create_cvt("cvt_w24", pretrained, **kwargs)
