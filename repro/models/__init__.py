"""The papers' models, registered with timm: after `import repro.models`,
`timm.create_model("cvt_13")`, `"vit_c_18gf"`, `"coatnet_0"` work like any timm model.
LeViT uses timm's own `levit_*` (see levit.py)."""

from repro.models import coatnet, cvt, levit, vit_c  # noqa: F401  (registers with timm)
