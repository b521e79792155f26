"""LeViT: "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", Graham,
El-Nouby, Touvron, Stock, Joulin, Jégou, Douze (ICCV 2021), arXiv:2104.01136.

The suite uses timm's `levit_128s` .. `levit_384` unchanged: timm ported them from the official
facebookresearch/LeViT code (same `specification` table, paper Table 2), and timm's released
weights are the official distilled checkpoints (`*.fb_dist_in1k`). Nothing is registered here.
timm builds them as `LevitDistilled` by default: a class head and a distillation head, whose
outputs are averaged at test time, as in the paper (Sec. 5.2); their parameters are counted in
the paper's numbers (LeViT-256: 18.89 M counted, 18.9 M in Table 3). Training with hard
distillation switches the model to return both heads (`set_distilled_training`).
"""

from __future__ import annotations

SMALL = {"depth": (1, 1, 1)}  # test size: one block per stage (timm's Levit keyword)

# Paper row -> timm model name, in Table 3's order.
LEVIT_MODELS = {
    "LeViT-128S": "levit_128s",
    "LeViT-128": "levit_128",
    "LeViT-192": "levit_192",
    "LeViT-256": "levit_256",
    "LeViT-384": "levit_384",
}
TIMM_MODELS = tuple(LEVIT_MODELS.values())  # timm's own models the suite uses


# ------------------------------------------------------------------------------------------
# The official releases (facebookresearch/LeViT, `LeViT-256-13b5763e.pth` etc.: `{"model":
# state_dict}`) name their tensors after the official module tree, levit.py@3772b8e:
#   patch_embed.{0,2,4,6}.{c,bn}        the four Conv2d_BN of the stem (odd indices: Hardswish)
#   blocks.K.m.{qkv,proj.1}.{c,bn}      Residual(Attention), + m.attention_biases
#   blocks.K.m.{0,2}.{c,bn}             Residual(MLP: Linear_BN, Hardswish, Linear_BN)
#   blocks.K.{kv,q.1,proj.1}.{c,bn}     AttentionSubsample (not residual), + attention_biases
#   head.{bn,l}, head_dist.{bn,l}       BN_Linear heads
# with `blocks` one flat Sequential over all stages. timm nests the same modules by stage:
# stem.convN.{linear,bn}, stages.S.blocks.B.{attn,mlp}, stages.S.downsample.{attn_downsample,
# mlp}, head.{bn,linear}. `from_official` renames by these names: each official block's kind
# is read from its own keys (qkv: attention, kv: subsample, 0/2: MLP), and the kinds' order
# gives the stage and block (a subsample opens the next stage; the MLP after it is the
# downsample's). Shapes are never used to pair tensors; the strict load after it checks them.

OFFICIAL_SOURCE = "facebookresearch/LeViT levit.py@3772b8e"
_CONV_BN = {"c": "linear", "bn": "bn"}  # Conv2d_BN / Linear_BN children -> timm's ConvNorm
_INNER = {  # official block kind -> (official child prefix -> timm child prefix)
    "attn": {"m.qkv.": "attn.qkv.", "m.proj.1.": "attn.proj.ln.",
             "m.attention_biases": "attn.attention_biases"},
    "mlp": {"m.0.": "mlp.ln1.", "m.2.": "mlp.ln2."},
    "subsample": {"kv.": "attn_downsample.kv.", "q.1.": "attn_downsample.q.ln.",
                  "proj.1.": "attn_downsample.proj.ln.",
                  "attention_biases": "attn_downsample.attention_biases"},
}


class OfficialKeyError(ValueError):
    """An official-looking LeViT state dict with a key this mapping does not know."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} of an official LeViT state dict has no counterpart in "
                         f"timm's LeViT (names as in {OFFICIAL_SOURCE})")
        self.key = key


def is_official(state: dict) -> bool:
    """Whether `state` is named like the official LeViT code (not like timm's port)."""
    return any(k.startswith("patch_embed.0.c.") for k in state) and \
        any(k.startswith("blocks.") for k in state)


def _child(rest: str) -> str:
    """`c.weight` -> `linear.weight`, `bn.running_mean` -> `bn.running_mean`."""
    head, _, tail = rest.partition(".")
    if head not in _CONV_BN:
        raise OfficialKeyError(rest)
    return f"{_CONV_BN[head]}.{tail}"


def _kind(keys: list[str]) -> str:
    if any(k.startswith("m.qkv.") for k in keys):
        return "attn"
    if any(k.startswith("kv.") for k in keys):
        return "subsample"
    if any(k.startswith("m.0.") for k in keys):
        return "mlp"
    raise OfficialKeyError(keys[0])


def _rename_block(rest: str, kind: str, prefix: str) -> str | None:
    if rest.endswith("attention_bias_idxs"):
        return None  # a buffer timm recomputes (its own checkpoint_filter_fn drops it too)
    for old, new in _INNER[kind].items():
        if rest == old:  # a parameter named directly (attention_biases)
            return prefix + new
        if rest.startswith(old):
            return prefix + new + _child(rest[len(old):])
    raise OfficialKeyError(rest)


def from_official(state: dict) -> dict:
    """An official LeViT state dict with timm's names (see the table above); raises
    OfficialKeyError naming the first key it cannot place."""
    blocks: dict[int, dict[str, str]] = {}
    out = {}
    for key in state:
        part, _, rest = key.partition(".")
        try:
            if part == "patch_embed":
                index, _, tail = rest.partition(".")
                if not index.isdigit() or int(index) % 2:
                    raise OfficialKeyError(rest)
                out[f"stem.conv{int(index) // 2 + 1}.{_child(tail)}"] = state[key]
            elif part in ("head", "head_dist"):
                child, _, tail = rest.partition(".")
                name = {"bn": "bn", "l": "linear"}.get(child)
                if name is None:
                    raise OfficialKeyError(rest)
                out[f"{part}.{name}.{tail}"] = state[key]
            elif part == "blocks":
                index, _, tail = rest.partition(".")
                if not index.isdigit():
                    raise OfficialKeyError(rest)
                blocks.setdefault(int(index), {})[tail] = key
            else:
                raise OfficialKeyError(key)
        except OfficialKeyError:
            raise OfficialKeyError(key) from None
    stage, block, after_subsample = 0, 0, False
    for index in sorted(blocks):
        rests = blocks[index]
        try:
            kind = _kind(sorted(rests))
        except OfficialKeyError:
            raise OfficialKeyError(next(iter(rests.values()))) from None
        if kind == "subsample":
            stage, block, after_subsample = stage + 1, 0, True
            prefix = f"stages.{stage}.downsample."
        elif kind == "mlp" and after_subsample:
            prefix, after_subsample = f"stages.{stage}.downsample.", False
        elif kind == "attn":
            prefix, after_subsample = f"stages.{stage}.blocks.{block}.", False
        else:  # the MLP that closes a block
            prefix = f"stages.{stage}.blocks.{block}."
            block += 1
        for rest, key in rests.items():
            try:
                name = _rename_block(rest, kind, prefix)
            except OfficialKeyError:
                raise OfficialKeyError(key) from None
            if name is not None:
                out[name] = state[key]
    return out


def official_layout(state: dict, model) -> tuple[dict, str] | None:
    """The family hook `load_strict` calls when keys differ: `state` renamed for a timm LeViT
    `model`, with a note, when it is in the official naming; else None."""
    if not is_official(state) or not type(model).__name__.startswith("Levit"):
        return None
    return from_official(state), f"official LeViT names ({OFFICIAL_SOURCE}) -> timm"
