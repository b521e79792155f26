"""The papers' models, registered with timm: after `import repro.models`,
`timm.create_model("cvt_13")`, `"vit_c_18gf"`, `"coatnet_0"` work like any timm model.
LeViT uses timm's own `levit_*` (see levit.py).

`create(name, resolution, **kw)` is the one way the suite builds a model at a resolution
(training, evaluation, counting, timing). `suite_models()` lists every model of the papers'
families (timm's `list_models` convention), and `small_kwargs(name)` the ordinary constructor
keywords that build it small for tests, declared by each family's module as `SMALL`.
"""

from __future__ import annotations

import timm

from repro.errors import UserError
from repro.models import coatnet, cvt, levit, vit_c  # noqa: F401  (registers with timm)

FAMILIES = (coatnet, cvt, levit, vit_c)


class UnknownModel(UserError, ValueError):
    """A model name that neither timm nor this package registers."""


def family(name: str):
    """The module of the suite that declares model `name` (registers it, or names it among
    timm's own in `TIMM_MODELS`), or None."""
    own = next((f for f in FAMILIES if name in getattr(f, "TIMM_MODELS", ())), None)
    if own is not None or not timm.is_model(name):
        return own
    module = timm.models.model_entrypoint(name).__module__
    return next((f for f in FAMILIES if f.__name__ == module), None)


def suite_models() -> list[str]:
    """Every model of the papers' families: registered here, or timm's own LeViTs."""
    return sorted(n for n in timm.list_models() if family(n) is not None)


def small_kwargs(name: str) -> dict:
    """Constructor keywords that build `name` small (fewer blocks, the paper's widths)."""
    return dict(family(name).SMALL)


def check_name(name: str) -> None:
    """An UnknownModel error, with the closest names, unless timm knows `name`."""
    if timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, suite_models(), n=3) or \
        difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModel(f"unknown model {name!r} (not registered with timm){hint}")


def official_layout(state: dict, model) -> tuple[dict, str] | None:
    """`state` renamed for `model`, with a note, when it is named like an official release
    that timm's port names differently (a family's `official_layout` hook: LeViT's); else
    None. Raises ValueError naming a key of such a release that has no place in `model`."""
    for f in FAMILIES:
        hook = getattr(f, "official_layout", None)
        found = hook(state, model) if hook is not None else None
        if found is not None:
            return found
    return None


def create(name: str, resolution: int, **kwargs):
    """timm model `name` for `resolution` px inputs.

    `img_size` is passed only to models whose input size is fixed (ViTs, CvT's positional
    tables, LeViT's attention biases) and differs from their default; convolutional-style
    models take any size and are built as registered. Other keyword arguments go to timm.
    """
    check_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    default = cfg.input_size[-1] if cfg is not None else 224
    fixed = cfg is None or getattr(cfg, "fixed_input_size", False)
    if resolution != default and fixed:
        kwargs.setdefault("img_size", resolution)
    return timm.create_model(name, **kwargs)
