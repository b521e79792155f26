"""Recipes: typed, validated, overridable YAML descriptions of one paper row's training run.

A recipe file is data only. It may inherit from other files with `_base_` (a path or a list of
paths relative to the file, merged left to right, the file's own keys last; mappings merge key by
key, everything else is replaced), use `${ENV_VAR}` / `${ENV_VAR:-default}` in strings, and be
changed from the command line with dotted overrides (`optim.lr=5e-4`). Every key is declared once
below, typed and documented; anything else is a one-line `RecipeError` that names the file and
the dotted key. Values that follow from the recipe (per-GPU batch, accumulation steps, effective
lr, warm-up steps) are computed by `derive()`, never written by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from repro.errors import UserError

__all__ = [
    "Recipe",
    "RecipeError",
    "Derived",
    "load_recipe",
    "load_typed",
    "parse_override",
    "derive",
    "field_docs",
    "path_report",
    "DATA_PATHS",
    "IMAGENET_TRAIN_IMAGES",
]

# ImageNet-1K (ILSVRC-2012) training split size; used to derive steps when no data file is at hand.
IMAGENET_TRAIN_IMAGES = 1_281_167


class RecipeError(UserError, ValueError):
    """A recipe problem, as one line: `FILE: KEY: what is wrong`."""

    def __init__(self, file: str | os.PathLike | None, key: str | None, message: str):
        self.file = str(file) if file is not None else None
        self.key = key
        self.message = message
        where = ": ".join(p for p in (self.file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


# --------------------------------------------------------------------------------------------
# Field declarations. `sci=False` marks keys that may change without making a run
# non-canonical (paths, workers, logging, launch, precision/layout switches that are recorded).


def _f(default: Any = dataclasses.MISSING, doc: str = "", *, sci: bool = True, check=None,
       only: str | None = None, not_on: dict | None = None, deviates_on: dict | None = None,
       inert: tuple = ()):
    """A recipe key. How the data paths (`ffcv`, `folder`) treat it, for `path_report`:
    `only`: the key configures that path alone (meaningless on the other); `not_on`: paths that
    cannot apply it, with the reason; `deviates_on`: paths that apply it differently from the
    official code, with how; `inert`: values at which the key does nothing (never listed)."""
    meta = {"doc": doc, "scientific": sci, "check": check, "only": only,
            "not_on": not_on or {}, "deviates_on": deviates_on or {}, "inert": inert}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _fraction(v):
    return None if 0 <= v <= 1 else "must be within [0, 1]"


def _pair(v):
    return None if len(v) == 2 else "must have exactly 2 values"


def _triple(v):
    return None if len(v) == 3 else "must have exactly 3 values"


def _policy(v):
    """An auto-augment string must parse (timm's grammar; repro.data.augment reads it)."""
    try:
        from repro.data.policy import parse_policy

        parse_policy(v)
    except ValueError as e:
        return str(e)
    return None


# The FFCV evaluation decoder's deviation from the recipes' protocol (PIL resize of the source
# image to res / crop_pct, centre crop): it centre-crops the stored copy and resizes the crop
# with OpenCV's area filter.
_FFCV_EVAL = ("FFCV's centre-crop decoder resizes the .beton's stored copy with OpenCV's area "
              "filter, not the source JPEG with PIL")


@dataclass(kw_only=True)
class ModelCfg:
    """The network: a timm model name (the suite registers the papers' models with timm)."""

    name: str = _f(doc="timm model name, e.g. vit_c_18gf, levit_256, cvt_13, coatnet_0")
    num_classes: int = _f(1000, "classifier outputs", check=_positive)
    drop_path: float = _f(0.0, "stochastic depth rate (linearly increasing over depth)",
                          check=_fraction)
    drop_rate: float = _f(0.0, "dropout before the classifier", check=_fraction)
    pretrained_file: str | None = _f(None, "local weights file to start from (no downloads)")
    kwargs: dict[str, Any] = _f({}, "extra keyword arguments for timm.create_model")


@dataclass(kw_only=True)
class DataCfg:
    """Where the images come from and how they are fed (augmentation lives in `aug`)."""

    dataset: Literal["imagenet", "digits"] = _f(
        "imagenet", "imagenet (files at train_path/val_path) or the built-in digits set")
    format: Literal["ffcv", "folder"] = _f(
        "ffcv", "ffcv (.beton files) or folder (torchvision ImageFolder, the baseline)", sci=False,
        deviates_on={"ffcv": "training images are decoded from the .beton's stored copies "
                     "(ffcv-imagenet's writer: longest side at most 500 px, half re-encoded as "
                     "JPEG quality 90), not from the source JPEGs"})
    train_path: str | None = _f(None, "training .beton file or ImageFolder directory", sci=False)
    val_path: str | None = _f(None, "validation .beton file or ImageFolder directory", sci=False)
    train_images: int | None = _f(
        IMAGENET_TRAIN_IMAGES, "training-set size, for steps per epoch before data is opened",
        check=_positive)
    resolution: int = _f(224, "training crop size in pixels", check=_positive)
    batch_size: int = _f(
        128, "largest per-device micro-batch that fits in memory; train.global_batch is kept by "
        "gradient accumulation", sci=False, check=_positive)
    workers: int = _f(8, "loader workers per process", sci=False, check=_non_negative)
    in_memory: bool = _f(True, "FFCV: the .beton fits in RAM: read it through the OS page "
                         "cache; false: ffcv's own page reader", sci=False, only="ffcv")
    interpolation: Literal["bilinear", "bicubic"] = _f(
        "bicubic", "resize interpolation (train crop; also the auto-augment geometric ops)",
        deviates_on={"ffcv": "FFCV's random-resized crop resizes with OpenCV's area filter "
                     "(hard-coded in ffcv 1.0.2); the auto-augment ops use this interpolation"})
    scale: list[float] = _f([0.08, 1.0], "RandomResizedCrop area range", check=_pair)
    ratio: list[float] = _f([0.75, 4 / 3], "RandomResizedCrop aspect-ratio range", check=_pair)
    hflip: float = _f(0.5, "horizontal flip probability", check=_fraction)
    mean: list[float] = _f([0.485, 0.456, 0.406], "normalisation mean (RGB, 0-1)", check=_triple)
    std: list[float] = _f([0.229, 0.224, 0.225], "normalisation std (RGB, 0-1)", check=_triple)
    repeated_aug: bool = _f(False, "repeated-augmentation sampler (DeiT/LeViT, 3 repeats)",
                            inert=(False,))


@dataclass(kw_only=True)
class AugCfg:
    """Per-image and per-batch augmentation (timm's transforms and Mixup)."""

    auto_augment: str | None = _f(
        None, "timm policy string: 'rand-m9-mstd0.5-inc1' (RandAugment), 'original' "
        "(AutoAugment), or null", check=_policy, inert=(None,))
    color_jitter: float | None = _f(None, "colour jitter strength (only without auto_augment)",
                                    inert=(None, 0.0))
    re_prob: float = _f(0.0, "random-erasing probability", check=_fraction, inert=(0.0,))
    re_mode: Literal["const", "rand", "pixel"] = _f("pixel", "random-erasing fill")
    re_count: int = _f(1, "random-erasing boxes per image", check=_positive)
    mixup: float = _f(0.0, "Mixup alpha (0 = off)", check=_non_negative)
    cutmix: float = _f(0.0, "CutMix alpha (0 = off)", check=_non_negative)
    mixup_prob: float = _f(1.0, "probability of applying Mixup/CutMix to a batch",
                           check=_fraction)
    mixup_switch_prob: float = _f(0.5, "probability of CutMix instead of Mixup when both are on",
                                  check=_fraction)
    mixup_mode: Literal["batch", "pair", "elem"] = _f("batch", "how Mixup parameters are drawn")


@dataclass(kw_only=True)
class OptimCfg:
    """The optimizer (timm's factory). Weight decay skips norms and biases unless told not to."""

    name: Literal["adamw", "sgd", "lamb", "adam"] = _f("adamw", "optimizer")
    lr: float = _f(doc="peak learning rate, at lr_batch images per step if lr_batch is set",
                   check=_positive)
    lr_batch: int | None = _f(
        None, "batch that `lr` is quoted for: effective lr = lr * global_batch / lr_batch. "
        "null = use lr as it is (never rescaled by the number of GPUs)", check=_positive)
    weight_decay: float = _f(0.0, "decoupled (AdamW) or L2 (SGD) weight decay",
                             check=_non_negative)
    wd_norm_bias: bool = _f(False, "also decay norm weights and biases (the papers do not)")
    wd_skip_model_list: bool = _f(
        True, "also exempt what the model's no_weight_decay() names from weight decay (timm's "
        "rule: position embeddings, class tokens, LeViT's attention biases, CoAtNet's "
        "relative-position tables); false decays them, as pycls does for ViT_P/ViT_C")
    betas: list[float] = _f([0.9, 0.999], "Adam betas", check=_pair)
    eps: float = _f(1.0e-8, "Adam epsilon", check=_positive)
    momentum: float = _f(0.9, "SGD momentum", check=_fraction)
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    clip_grad: float | None = _f(None, "gradient clipping threshold (null = off)",
                                 check=_positive)
    clip_mode: Literal["norm", "agc", "value"] = _f(
        "norm", "norm (global L2), agc (adaptive, LeViT) or value")


@dataclass(kw_only=True)
class ScheduleCfg:
    """Learning-rate schedule (timm's schedulers), stepped every optimizer step."""

    name: Literal["cosine", "linear", "constant"] = _f("cosine", "decay shape after warm-up")
    epochs: int = _f(doc="training epochs", check=_positive)
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs", check=_non_negative)
    warmup_steps: int | None = _f(
        None, "linear warm-up length in optimizer steps (overrides warmup_epochs)",
        check=_non_negative)
    warmup_lr: float = _f(1.0e-6, "learning rate at the start of warm-up", check=_non_negative)
    min_lr: float | None = _f(None, "final learning rate (absolute)", check=_non_negative)
    min_lr_ratio: float | None = _f(None, "final learning rate as a fraction of the peak",
                                    check=_fraction)
    cooldown_epochs: int = _f(0, "epochs held at min_lr after the decay", check=_non_negative)


@dataclass(kw_only=True)
class TrainCfg:
    """The training loop: batch, precision, regularisation, EMA, checkpoints."""

    global_batch: int = _f(doc="images per optimizer step over all devices (the one batch knob)",
                           check=_positive)
    label_smoothing: float = _f(0.0, "label smoothing", check=_fraction)
    ema: float | None = _f(None, "model EMA decay per step (null = no EMA)", check=_fraction)
    max_steps: int | None = _f(None, "stop after this many optimizer steps (a truncated run)",
                               check=_positive)
    amp: Literal["none", "bf16", "fp16"] = _f(
        "none", "autocast dtype (fp16 adds a GradScaler; GPU only); recorded in results",
        sci=False)
    channels_last: bool = _f(False, "NHWC memory format; recorded in results", sci=False)
    compile: bool = _f(False, "torch.compile the model; recorded in results", sci=False)
    device: Literal["auto", "cuda", "cpu"] = _f("auto", "auto = cuda if available", sci=False)
    seed: int = _f(0, "random seed (seeds are repeats, not a change of recipe)", sci=False)
    log_every_steps: int = _f(50, "metrics.jsonl / TensorBoard interval", sci=False,
                              check=_positive)
    checkpoint_every_steps: int = _f(1000, "checkpoints/last.pt interval (and every epoch end)",
                                     sci=False, check=_positive)
    output_dir: str = _f("runs", "runs are written to OUTPUT_DIR/<recipe>/<run-id>", sci=False)
    run_id: str | None = _f(None, "fixed run id (a relaunch with the same id resumes)",
                            sci=False)


@dataclass(kw_only=True)
class EvalCfg:
    """The evaluation protocol (resize, centre crop, interpolation shift top-1 by tenths)."""

    resolution: int | None = _f(None, "test crop size (null = data.resolution)", check=_positive)
    crop_pct: float = _f(0.875, "centre-crop fraction: resize to resolution / crop_pct",
                         check=_fraction, deviates_on={"ffcv": _FFCV_EVAL})
    interpolation: Literal["bilinear", "bicubic"] = _f(
        "bicubic", "resize interpolation (test)",
        deviates_on={"ffcv": _FFCV_EVAL})
    batch_size: int = _f(256, "per-device evaluation batch", sci=False, check=_positive)
    every_epochs: int = _f(1, "evaluate every N epochs (and always at the end)", sci=False,
                           check=_positive)


@dataclass(kw_only=True)
class DistillCfg:
    """Knowledge distillation (LeViT, DeiT): a teacher from a local weights file."""

    type: Literal["none", "hard", "soft"] = _f("none", "distillation loss")
    teacher: str | None = _f(None, "teacher timm model name, e.g. regnety_160")
    teacher_file: str | None = _f(None, "teacher weights file on local disk", sci=False)
    alpha: float = _f(0.5, "weight of the distillation term", check=_fraction)
    tau: float = _f(1.0, "soft-distillation temperature", check=_positive)


@dataclass(kw_only=True)
class LaunchCfg:
    """Resources the paper-scale run asks for (the cluster profile supplies partition etc.)."""

    nodes: int = _f(1, "nodes", sci=False, check=_positive)
    gpus_per_node: int = _f(8, "GPUs (= processes) per node", sci=False, check=_positive)
    cpus_per_task: int = _f(10, "CPU cores per process", sci=False, check=_positive)
    mem_gb_per_gpu: int = _f(40, "host memory per process, GB", sci=False, check=_positive)
    timeout_min: int = _f(4320, "Slurm time limit per job (requeued and resumed after)",
                          sci=False, check=_positive)


@dataclass(kw_only=True)
class ProfileCfg:
    """torch.profiler schedule for `repro profile` (wait, warm-up, active steps)."""

    wait: int = _f(1, "steps skipped", sci=False, check=_non_negative)
    warmup: int = _f(1, "steps traced but discarded", sci=False, check=_non_negative)
    active: int = _f(3, "steps recorded", sci=False, check=_positive)
    repeat: int = _f(1, "cycles", sci=False, check=_positive)
    record_shapes: bool = _f(False, "record operator input shapes", sci=False)
    profile_memory: bool = _f(True, "track tensor memory", sci=False)
    with_stack: bool = _f(False, "record Python stacks (large traces)", sci=False)


@dataclass(kw_only=True)
class Recipe:
    """A whole recipe: which paper row it reproduces and how."""

    model: ModelCfg
    optim: OptimCfg
    schedule: ScheduleCfg
    train: TrainCfg
    paper: str | None = _f(None, "paper key in repro/papers/, e.g. earlyconv")
    row: str | None = _f(None, "row of that paper's table, e.g. ViT_C-18GF")
    notes: str | None = _f(None, "free text kept with the run", sci=False)
    data: DataCfg = field(default_factory=DataCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    launch: LaunchCfg = field(default_factory=LaunchCfg)
    profile: ProfileCfg = field(default_factory=ProfileCfg)
    # Not recipe keys: where the recipe came from and what was changed on the command line.
    name: str = field(default="", metadata={"internal": True})
    path: str = field(default="", metadata={"internal": True})
    overrides: list[str] = field(default_factory=list, metadata={"internal": True})
    non_canonical_keys: list[str] = field(default_factory=list, metadata={"internal": True})

    @property
    def canonical(self) -> bool:
        """True when no scientific key differs from the recipe file."""
        return not self.non_canonical_keys

    @property
    def row_id(self) -> str | None:
        """The targeted paper row as `paper/row`, or None."""
        return f"{self.paper}/{self.row}" if self.paper and self.row else None

    def to_dict(self) -> dict[str, Any]:
        """The recipe's keys only (what a resolved `recipe.yaml` holds)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("internal")}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None,
                              width=100)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# YAML reading: YAML 1.1 reads `1e-3` as a string; recipes are full of such numbers, so floats
# are recognised the YAML 1.2 way.

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(path, None, f"cannot read recipe: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise RecipeError(f"{path}{line}", None, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise RecipeError(path, None, f"YAML error: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(path, None, f"a recipe must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, prov: dict, top_file: str, prefix: str = "") -> dict:
    """Merge `top` over `base` (mappings key by key, other values replaced); record provenance."""
    out = dict(base)
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, prov, top_file, dotted + ".")
        else:
            out[key] = value
            for k in [k for k in prov if k == dotted or k.startswith(dotted + ".")]:
                del prov[k]
            _record(value, dotted, prov, top_file)
    return out


def _record(value, dotted: str, prov: dict, file: str):
    prov[dotted] = file
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, f"{dotted}.{k}", prov, file)


def _load_tree(path: Path, chain: tuple[Path, ...], prov: dict) -> dict:
    """Read `path` with its `_base_` files resolved; `prov` maps dotted keys to files."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path):], path))
        raise RecipeError(chain[-1], "_base_", f"cyclic _base_ inheritance: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(path, "_base_", "must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / _interpolate(base, path, "_base_")).resolve()
        if not base_path.is_file():
            raise RecipeError(path, "_base_", f"base file not found: {base} ({base_path})")
        base_prov: dict = {}
        base_data = _load_tree(base_path, (*chain, path), base_prov)
        merged = _merge(merged, base_data, prov, str(base_path))
        prov.update(base_prov)
    return _merge(merged, data, prov, str(path))


# --------------------------------------------------------------------------------------------
# Environment interpolation

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(text: str, file, key: str) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise RecipeError(file, key, f"environment variable {name} is not set "
                                  f"(set it, or write ${{{name}:-default}})")
            return default
        return value

    return _ENV.sub(sub, text)


def _interpolate_tree(value, prov: dict, default_file, key: str = ""):
    if isinstance(value, str):
        return _interpolate(value, prov.get(key, default_file), key)
    if isinstance(value, dict):
        return {k: _interpolate_tree(v, prov, default_file, f"{key}.{k}" if key else k)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(v, prov, default_file, key) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Overrides

def parse_override(text: str) -> tuple[str, Any]:
    """Split `key.sub=value` and read the value as a YAML scalar, list or mapping."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise RecipeError(None, None, f"override '{text}' is not of the form key.sub=value")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unquoted string YAML cannot read is still a fine string
    return key, value


def _set_dotted(tree: dict, key: str, value) -> Any:
    """Set `a.b.c` in nested dicts; return the previous value (or _ABSENT)."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    old = node.get(parts[-1], _ABSENT)
    node[parts[-1]] = value
    return old


_ABSENT = object()


# --------------------------------------------------------------------------------------------
# Typing and validation

_SECTIONS = {f.name: f for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")}


def _all_keys(cls=Recipe, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted recipe key and its field declaration."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_all_keys(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def field_docs() -> dict[str, str]:
    """Dotted key -> its one-line documentation (for `--help` style listings)."""
    return {k: f.metadata.get("doc", "") for k, f in _all_keys().items()}


DATA_PATHS = ("ffcv", "folder")
_PATH_SECTIONS = ("data", "aug", "eval")  # the keys whose meaning depends on the data path


def path_report(recipe: Recipe, fmt: str | None = None, *, exact_eval: bool = False
                ) -> tuple[list[str], list[str]]:
    """(not applied, deviations) of `recipe` on data path `fmt` (default: its own), from the
    schema's field metadata: keys the path cannot apply, and keys it applies differently from
    the official code, each as `key=value` (deviations with how). Keys at an inert value are
    never listed; `exact_eval`: the evaluation file reproduces the eval protocol exactly."""
    fmt = fmt or recipe.data.format
    not_applied, deviations = [], []
    for key, f in _all_keys().items():
        meta = f.metadata
        if key.split(".")[0] not in _PATH_SECTIONS or meta.get("only") not in (None, fmt):
            continue
        value = _get_dotted(recipe, key)
        if value in meta.get("inert", ()) or (exact_eval and key.startswith("eval.")):
            continue
        shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        shown = shown.removesuffix("\n...").strip()
        if fmt in meta.get("not_on", {}):
            not_applied.append(f"{key}={shown}")
        if fmt in meta.get("deviates_on", {}):
            deviations.append(f"{key}={shown} ({meta['deviates_on'][fmt]})")
    return not_applied, deviations


def _suggest(dotted: str, root=None) -> str:
    root = root or Recipe
    keys = list(_all_keys(root)) + [f.name for f in dataclasses.fields(root)
                                    if not f.metadata.get("internal")]
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != dotted]
    close = same_leaf or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1)
        close = [k for k in keys if close and k.endswith("." + close[0])][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is list:
        return f"list of {_type_name(typing.get_args(t)[0])}"
    if origin is dict:
        return "mapping"
    return {type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


def _coerce(value, t, where) -> Any:
    """Check `value` against type `t`; return it converted (int -> float only)."""
    origin = typing.get_origin(t)
    if t is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except RecipeError:
                continue
        raise where(f"expected {_type_name(t)}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(t)
        if value not in choices:
            raise where(f"bad value {value!r}; choose one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise where(f"expected {_type_name(t)}, got {_describe(value)}")
        (item,) = typing.get_args(t)
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise where(f"expected a mapping, got {_describe(value)}")
        return dict(value)
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif t is bool or t is str:
        if isinstance(value, t):
            return value
    raise where(f"expected {_type_name(t)}, got {_describe(value)}")


def _describe(value) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _build(cls, data, prefix: str, prov: dict, default_file, root=None):
    """Turn a (merged) mapping into dataclass `cls`, checking every key and value."""
    def err_for(key):
        return lambda msg: RecipeError(prov.get(key, default_file), key, msg)

    if not isinstance(data, dict):
        key = prefix.rstrip(".")
        raise err_for(key)(f"expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise RecipeError(prov.get(dotted, default_file), dotted,
                              f"unknown key{_suggest(dotted, root or cls)}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        t = hints[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, data.get(name, {}) or {}, dotted + ".", prov, default_file,
                                  root or cls)
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(default_file, dotted, "missing required key")
            continue
        value = _coerce(data[name], t, err_for(dotted))
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise err_for(dotted)(f"bad value {data[name]!r}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(r: Recipe, prov: dict, file):
    """Checks that involve more than one key."""
    def err(key, msg):
        return RecipeError(prov.get(key, file), key, msg)

    if r.schedule.min_lr is not None and r.schedule.min_lr_ratio is not None:
        raise err("schedule.min_lr_ratio", "set schedule.min_lr or schedule.min_lr_ratio, not both")
    if r.distill.type != "none" and not r.distill.teacher:
        raise err("distill.teacher", f"distill.type is {r.distill.type!r} but no teacher is named")
    if r.data.dataset == "imagenet" and r.data.train_images is None:
        raise err("data.train_images", "required for imagenet (1281167 for ImageNet-1K)")
    if bool(r.paper) != bool(r.row):
        key = "row" if r.paper else "paper"
        raise err(key, "paper and row are given together (a row is addressed as paper/row)")
    if r.paper and r.row:
        from repro import papers  # the recipe's target must exist in the tables

        try:
            papers.get_row(f"{r.paper}/{r.row}")
        except papers.PaperTableError as e:
            raise err("row", str(e)) from None


# --------------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, interpolate, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, None, "recipe file not found")
    prov: dict[str, str] = {}
    tree = _load_tree(path, (), prov)
    file = str(path)
    from_file = _interpolate_tree(tree, prov, file)

    parsed = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except RecipeError as e:
            raise RecipeError(file, None, e.message) from None
        if key not in _all_keys() and key not in _SECTIONS:
            raise RecipeError(file, key, f"unknown key in override '{text}'{_suggest(key)}")
        parsed.append((key, value))
        _set_dotted(tree, key, value)
        for k in [k for k in prov if k == key or k.startswith(key + ".")]:
            del prov[k]
        _record(value, key, prov, f"{file} (override '{text}')")

    tree = _interpolate_tree(tree, prov, file)
    recipe = _build(Recipe, tree, "", prov, file)
    _cross_checks(recipe, prov, file)

    recipe.name = path.stem
    recipe.path = str(path)
    recipe.overrides = list(overrides)
    recipe.non_canonical_keys = _changed_scientific(from_file, recipe)
    return recipe


def load_typed(path: str | os.PathLike, cls):
    """Read a YAML file (with `_base_` and `${ENV}`) into dataclass `cls`, checked like a
    recipe: one-line errors naming the file and the dotted key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, None, "file not found")
    prov: dict[str, str] = {}
    tree = _interpolate_tree(_load_tree(path, (), prov), prov, str(path))
    return _build(cls, tree, "", prov, str(path))


def _changed_scientific(from_file: dict, recipe: Recipe) -> list[str]:
    """Scientific keys whose value differs from what the recipe file alone gives."""
    try:
        original = _build(Recipe, from_file, "", {}, recipe.path)
    except RecipeError:
        # The file alone may be invalid only because an override completes it: then every
        # overridden key counts as a change.
        return sorted({parse_override(o)[0] for o in recipe.overrides})
    changed = []
    for key, f in _all_keys().items():
        if not f.metadata.get("scientific", True):
            continue
        if _get_dotted(original, key) != _get_dotted(recipe, key):
            changed.append(key)
    return changed


def _get_dotted(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# Derived values

@dataclass(frozen=True)
class Derived:
    """Values that follow from a recipe and a world size; shown by --dry-run, used by train."""

    world_size: int
    global_batch: int
    per_device_batch: int  # images each device contributes to one optimizer step
    micro_batch: int  # images per forward/backward pass
    accum_steps: int  # forward/backward passes per optimizer step
    lr: float  # effective peak learning rate
    min_lr: float
    steps_per_epoch: int | None
    total_steps: int | None  # of the full schedule (train.max_steps stops a run earlier)
    warmup_steps: int | None


def derive(recipe: Recipe, world_size: int, train_images: int | None = None) -> Derived:
    """Per-device batch, accumulation and schedule lengths for `world_size` processes.

    The global batch is kept exactly: each device takes global_batch / world_size images per
    step, in the fewest equal micro-batches no larger than `data.batch_size`.
    """
    gb = recipe.train.global_batch
    if world_size < 1:
        raise RecipeError(recipe.path, "launch", f"world size must be >= 1, got {world_size}")
    if gb % world_size:
        raise RecipeError(recipe.path, "train.global_batch",
                          f"{gb} is not divisible by world size {world_size}")
    share = gb // world_size
    accum = -(-share // recipe.data.batch_size)
    while share % accum:
        accum += 1
    lr = recipe.optim.lr
    if recipe.optim.lr_batch:
        lr = lr * gb / recipe.optim.lr_batch
    s = recipe.schedule
    min_lr = s.min_lr if s.min_lr is not None else lr * (s.min_lr_ratio or 0.0)
    n = train_images or recipe.data.train_images
    if n and recipe.data.repeated_aug:
        n = n // 256 * 256  # RASampler's epoch (repro.data.order.repeated_aug_length)
    steps = n // gb if n else None  # the train loader drops the last partial batch
    if steps == 0:
        raise RecipeError(recipe.path, "train.global_batch",
                          f"{gb} is larger than the training set ({n} images)")
    total = steps * s.epochs if steps else None  # the schedule's length; max_steps truncates
    if s.warmup_steps is not None:
        warm = s.warmup_steps
    else:
        warm = round(s.warmup_epochs * steps) if steps else None
    return Derived(world_size, gb, share, share // accum, accum, lr, min_lr, steps, total, warm)
