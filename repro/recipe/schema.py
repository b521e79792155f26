"""The recipe schema: every key a recipe may set, declared once, typed, documented and checked.

`sci=False` marks keys that may change without making a run non-canonical; the data-path
metadata (`only`, `not_on`, `deviates_on`, `inert`) feeds `repro.recipe.path_report`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from repro.config import fraction, key, non_negative, pair, plain, positive, triple
from repro.recipe.policy import parse_policy

# ImageNet-1K (ILSVRC-2012) training split size; used to derive steps when no data file is at hand.
IMAGENET_TRAIN_IMAGES = 1_281_167


# Field declarations. `sci=False` marks keys that may change without making a run
# non-canonical (paths, workers, logging, launch, precision/layout switches that are recorded).


def _f(default: Any = dataclasses.MISSING, doc: str = "", *, sci: bool = True, check=None,
       name: str | None = None, only: str | None = None, not_on: dict | None = None,
       deviates_on: dict | None = None,
       inert: tuple = ()):
    """A recipe key. How the data paths (`ffcv`, `folder`) treat it, for `path_report`:
    `only`: the key configures that path alone (meaningless on the other); `not_on`: paths that
    cannot apply it, with the reason; `deviates_on`: paths that apply it differently from the
    official code, with how; `inert`: values at which the key does nothing (never listed)."""
    return key(default, doc, check=check, name=name, scientific=sci, only=only, not_on=not_on or {},
               deviates_on=deviates_on or {}, inert=inert)


def _policy(v):
    """An auto-augment string must parse (timm's grammar, read by repro.data.augment)."""
    try:
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
    num_classes: int = _f(1000, "classifier outputs", check=positive)
    drop_path: float = _f(0.0, "stochastic depth rate (linearly increasing over depth)",
                          check=fraction)
    drop_rate: float = _f(0.0, "dropout before the classifier", check=fraction)
    pretrained_file: str | None = _f(None, "local weights file to start from (no downloads)")
    kwargs: dict[str, Any] = _f({}, "extra keyword arguments for timm.create_model")


@dataclass(kw_only=True)
class DataCfg:
    """Where the images come from and how they are fed (augmentation lives in `aug`)."""

    dataset: Literal["imagenet", "imagenet21k", "digits"] = _f(
        "imagenet", "imagenet or imagenet21k (files at train_path/val_path), or the built-in "
        "digits set")
    format: Literal["ffcv", "folder"] = _f(
        "ffcv", "ffcv (.beton files) or folder (torchvision ImageFolder, the baseline)", sci=False,
        deviates_on={"ffcv": "training images are decoded from the .beton's stored copies "
                     "(ffcv-imagenet's writer: longest side at most 500 px, half re-encoded as "
                     "JPEG quality 90), not from the source JPEGs"})
    train_path: str | None = _f(None, "training .beton file or ImageFolder directory", sci=False)
    val_path: str | None = _f(None, "validation .beton file or ImageFolder directory", sci=False)
    train_images: int | None = _f(
        IMAGENET_TRAIN_IMAGES, "training-set size, for steps per epoch before data is opened",
        check=positive)
    resolution: int = _f(224, "training crop size in pixels", check=positive)
    batch_size: int = _f(
        128, "largest per-device micro-batch that fits in memory; train.global_batch is kept by "
        "gradient accumulation", sci=False, check=positive)
    workers: int = _f(8, "loader workers per process", sci=False, check=non_negative)
    in_memory: bool = _f(True, "FFCV: the .beton fits in RAM: read it through the OS page "
                         "cache; false: ffcv's own page reader", sci=False, only="ffcv")
    interpolation: Literal["bilinear", "bicubic"] = _f(
        "bicubic", "resize interpolation (train crop; also the auto-augment geometric ops)",
        deviates_on={"ffcv": "FFCV's random-resized crop resizes with OpenCV's area filter "
                     "(hard-coded in ffcv 1.0.2); the auto-augment ops use this interpolation"})
    scale: list[float] = _f([0.08, 1.0], "RandomResizedCrop area range", check=pair)
    ratio: list[float] = _f([0.75, 4 / 3], "RandomResizedCrop aspect-ratio range", check=pair)
    hflip: float = _f(0.5, "horizontal flip probability", check=fraction)
    mean: list[float] = _f([0.485, 0.456, 0.406], "normalisation mean (RGB, 0-1)", check=triple)
    std: list[float] = _f([0.229, 0.224, 0.225], "normalisation std (RGB, 0-1)", check=triple)
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
    re_prob: float = _f(0.0, "random-erasing probability", check=fraction, inert=(0.0,))
    re_mode: Literal["const", "rand", "pixel"] = _f("pixel", "random-erasing fill")
    re_count: int = _f(1, "random-erasing boxes per image", check=positive)
    mixup: float = _f(0.0, "Mixup alpha (0 = off)", check=non_negative)
    cutmix: float = _f(0.0, "CutMix alpha (0 = off)", check=non_negative)
    mixup_prob: float = _f(1.0, "probability of applying Mixup/CutMix to a batch",
                           check=fraction)
    mixup_switch_prob: float = _f(0.5, "probability of CutMix instead of Mixup when both are on",
                                  check=fraction)
    mixup_mode: Literal["batch", "pair", "elem"] = _f("batch", "how Mixup parameters are drawn")


@dataclass(kw_only=True)
class OptimCfg:
    """The optimizer (timm's factory). Weight decay skips norms and biases unless told not to."""

    name: Literal["adamw", "sgd", "lamb", "adam"] = _f("adamw", "optimizer")
    lr: float = _f(doc="peak learning rate, at lr_batch images per step if lr_batch is set",
                   check=positive)
    lr_batch: int | None = _f(
        None, "batch that `lr` is quoted for: effective lr = lr * global_batch / lr_batch. "
        "null = use lr as it is (never rescaled by the number of GPUs)", check=positive)
    weight_decay: float = _f(0.0, "decoupled (AdamW) or L2 (SGD) weight decay",
                             check=non_negative)
    wd_norm_bias: bool = _f(False, "also decay norm weights and biases (the papers do not)")
    wd_skip_model_list: bool = _f(
        True, "also exempt what the model's no_weight_decay() names from weight decay (timm's "
        "rule: position embeddings, class tokens, LeViT's attention biases, CoAtNet's "
        "relative-position tables); false decays them, as pycls does for ViT_P/ViT_C")
    betas: list[float] = _f([0.9, 0.999], "Adam betas", check=pair)
    eps: float = _f(1.0e-8, "Adam epsilon", check=positive)
    momentum: float = _f(0.9, "SGD momentum", check=fraction)
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    clip_grad: float | None = _f(None, "gradient clipping threshold (null = off)",
                                 check=positive)
    clip_mode: Literal["norm", "agc", "value"] = _f(
        "norm", "norm (global L2), agc (adaptive, LeViT) or value")


@dataclass(kw_only=True)
class ScheduleCfg:
    """Learning-rate schedule (timm's schedulers), stepped every optimizer step."""

    name: Literal["cosine", "linear", "constant"] = _f("cosine", "decay shape after warm-up")
    epochs: int = _f(doc="training epochs", check=positive)
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs", check=non_negative)
    warmup_steps: int | None = _f(
        None, "linear warm-up length in optimizer steps (overrides warmup_epochs)",
        check=non_negative)
    warmup_lr: float = _f(1.0e-6, "learning rate at the start of warm-up (absolute, as timm's "
                          "warmup_lr)", check=non_negative)
    warmup_lr_ratio: float | None = _f(
        None, "learning rate at the start of warm-up as a fraction of the peak (pycls's "
        "OPTIM.WARMUP_FACTOR: it follows the lr when the batch scales it); instead of warmup_lr",
        check=fraction)
    min_lr: float | None = _f(None, "final learning rate (absolute)", check=non_negative)
    min_lr_ratio: float | None = _f(None, "final learning rate as a fraction of the peak",
                                    check=fraction)
    cooldown_epochs: int = _f(0, "epochs held at min_lr after the decay", check=non_negative)


@dataclass(kw_only=True)
class TrainCfg:
    """The training loop: batch, precision, regularisation, EMA, checkpoints."""

    global_batch: int = _f(doc="images per optimizer step over all devices (the one batch knob)",
                           check=positive)
    label_smoothing: float = _f(0.0, "label smoothing", check=fraction)
    loss: Literal["softmax", "sigmoid"] = _f(
        "softmax", "softmax cross-entropy, or sigmoid: a binary cross-entropy per class "
        "(timm's BinaryCrossEntropy, smoothing as label_smoothing; CoAtNet's ImageNet-21K "
        "pretraining, Table 10)")
    ema: float | None = _f(None, "model EMA decay per step (null = no EMA)", check=fraction)
    max_steps: int | None = _f(None, "stop after this many optimizer steps (a truncated run)",
                               check=positive)
    amp: Literal["none", "bf16", "fp16"] = _f(
        "none", "autocast dtype (fp16 adds a GradScaler; GPU only); recorded in results",
        sci=False)
    channels_last: bool = _f(False, "NHWC memory format; recorded in results", sci=False)
    compile: bool = _f(False, "torch.compile the model; recorded in results", sci=False)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = _f(
        "inductor", "torch.compile backend: inductor (generated kernels: Triton on GPU, C++ on "
        "CPU), aot_eager (forward and backward traced, no code generated: checks that a model "
        "compiles in seconds), eager (Dynamo's graph capture only)", sci=False)
    device: Literal["auto", "cuda", "cpu"] = _f("auto", "auto = cuda if available", sci=False)
    seed: int = _f(0, "random seed (seeds are repeats, not a change of recipe)", sci=False)
    log_every_steps: int = _f(50, "metrics.jsonl / TensorBoard interval", sci=False,
                              check=positive)
    checkpoint_every_steps: int = _f(1000, "checkpoints/last.pt interval (and every epoch end)",
                                     sci=False, check=positive)
    output_dir: str = _f("runs", "runs are written to OUTPUT_DIR/<recipe>/<run-id>", sci=False)
    run_id: str | None = _f(None, "fixed run id (a relaunch with the same id resumes)",
                            sci=False)


@dataclass(kw_only=True)
class EvalCfg:
    """The evaluation protocol (resize, centre crop, interpolation shift top-1 by tenths)."""

    resolution: int | None = _f(None, "test crop size (null = data.resolution)", check=positive)
    crop_pct: float = _f(0.875, "centre-crop fraction: resize to resolution / crop_pct",
                         check=fraction, deviates_on={"ffcv": _FFCV_EVAL})
    interpolation: Literal["bilinear", "bicubic"] = _f(
        "bicubic", "resize interpolation (test)",
        deviates_on={"ffcv": _FFCV_EVAL})
    batch_size: int = _f(256, "per-device evaluation batch", sci=False, check=positive)
    every_epochs: int = _f(1, "evaluate every N epochs (and always at the end)", sci=False,
                           check=positive)


@dataclass(kw_only=True)
class DistillCfg:
    """Knowledge distillation (LeViT, DeiT): a teacher from a local weights file."""

    type: Literal["none", "hard", "soft"] = _f("none", "distillation loss")
    teacher: str | None = _f(None, "teacher timm model name, e.g. regnety_160")
    teacher_file: str | None = _f(None, "teacher weights file on local disk", sci=False)
    alpha: float = _f(0.5, "weight of the distillation term", check=fraction)
    tau: float = _f(1.0, "soft-distillation temperature", check=positive)


@dataclass(kw_only=True)
class InitCfg:
    """The stage this recipe starts from: another recipe's trained weights (a fine-tune)."""

    from_recipe: str | None = _f(
        None, "recipe of the stage this one fine-tunes, relative to this recipe file; its "
        "complete, canonical run of the same seed is used (`repro launch` runs it first)",
        name="from")
    weights: Literal["ema", "raw"] = _f("ema", "the parent's EMA weights, or its raw ones")
    run: str | None = _f(None, "a parent run directory, instead of the one found by seed",
                         sci=False)


@dataclass(kw_only=True)
class LaunchCfg:
    """The paper-scale run's size: a `--cluster` job asks for exactly this many nodes and GPUs
    per node (the cluster profile supplies partition, cores, memory and time limit)."""

    nodes: int = _f(1, "nodes", sci=False, check=positive)
    gpus_per_node: int = _f(8, "GPUs (= processes) per node; on a CPU cluster the profile's "
                            "tasks_per_node", sci=False, check=positive)


@dataclass(kw_only=True)
class ProfileCfg:
    """torch.profiler schedule for `repro profile` (wait, warm-up, active steps)."""

    wait: int = _f(1, "steps skipped", sci=False, check=non_negative)
    warmup: int = _f(1, "steps traced but discarded", sci=False, check=non_negative)
    active: int = _f(3, "steps recorded", sci=False, check=positive)
    repeat: int = _f(1, "cycles", sci=False, check=positive)
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
    init: InitCfg = field(default_factory=InitCfg)
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
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("internal")}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None,
                              width=100)
