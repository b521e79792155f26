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
