"""`repro bench`: images/s of models, with every setting that moves the figure recorded beside it.

The method is timm's `benchmark.py`: synthetic input, a warm-up, a CUDA synchronisation after
every step, `torch.inference_mode()` for inference, a full step (forward, loss, backward,
optimizer step) for training, and batch halving on out-of-memory (`repro.measure.steps`). On
top of it:
- interleaved windows (`repro.measure.timing`): each model is warmed up, then timed over
  `repeats` windows of a fixed number of steps, one window of each model per round, the order
  rotating; the figure is the median window, min and max beside it; a window in which other
  processes took more than `quiet_pct` % of the machine is re-timed once it is quiet;
- MFU: model FLOPs (2 x the multiply-adds `repro.measure.complexity` counts per image; x3 for a
  training step) x images/s over the rate of a large `torch.mm` timed on the same device, dtype
  and threads, interleaved with the models;
- reference models timed in the same run, so ratios stand beside absolute figures;
- `--fuse-bn` folds BatchNorm into the layer before it (`repro.measure.fuse`);
- `--protocol levit`: the LeViT paper's speed_test.py settings (CPU: 1 thread, batch 16;
  GPU: AMP, batch 2048, 1024 for LeViT-384; BatchNorm fused).
This module resolves the settings and targets and runs the bench; `repro.bench` is its
command line, `repro.report.throughput` renders its record.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import timm
import torch

import repro.models  # noqa: F401  (registers the papers' models with timm)
from repro.errors import UserError
from repro.measure.machine import machine, thread_env, torch_backends, versions
from repro.measure.steps import matmul_item, model_item, peak_dtype
from repro.measure.timing import Item, Plan, interleave, other_load, ratio, summarise
from repro.papers import paper_info

DEFAULT_BATCH = {"cpu": 16, "cuda": 256}

# facebookresearch/LeViT@3772b8e speed_test.py: the paper's timing protocol (Sec 5.1, Table 3).
LEVIT_GPU_BATCH = {"resnet50": 1024, "levit_384": 1024, "efficientnet_b0": 1024,
                   "efficientnet_b1": 1024, "efficientnet_b2": 512, "efficientnet_b3": 512,
                   "efficientnet_b4": 256}  # every other model: 2048
LEVIT_RES = {"efficientnet_b1": 240, "efficientnet_b2": 260, "efficientnet_b3": 300,
             "efficientnet_b4": 380}  # every other model: 224
LEVIT_TIMING = {"warmup_s": 10.0, "window_s": 10.0, "repeats": 6}  # 10 s warm-up, 60 s timed


class BenchError(UserError, ValueError):
    """Bad input to `repro bench` (unknown model, conflicting options): one line, exit 1."""


@dataclass
class Settings(Plan):
    """How to time: every field is recorded with the figures (the timing plan's included)."""

    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    batch: int | None = None  # None: per model (protocol), else DEFAULT_BATCH
    res: int | None = None  # None: the recipe's or the model's default input size
    mode: str = "infer"  # infer | train
    amp: str | None = None  # None (fp32) | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    fuse_bn: bool = False
    protocol: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> str:
        return f"amp {self.amp}" if self.amp else "fp32"


@dataclass
class Target:
    """One model to time, resolved from a model name or a recipe."""

    label: str
    model: str
    res: int
    batch: int
    role: str = "target"  # target | reference
    kwargs: dict = field(default_factory=dict)
    recipe: str | None = None


def default_res(model: str) -> int:
    cfg = timm.models.get_pretrained_cfg(model)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def batch_for(model: str, s: Settings) -> int:
    """The batch a model is timed at: --batch, the protocol's, or the default."""
    if s.batch:
        return s.batch
    if s.protocol == "levit":
        return LEVIT_GPU_BATCH.get(model, 2048) if s.device == "cuda" else 16
    return DEFAULT_BATCH[s.device]


def res_for(model: str, s: Settings) -> int:
    if s.res:
        return s.res
    if s.protocol == "levit":
        return LEVIT_RES.get(model, 224)
    return default_res(model)


def resolve_target(arg: str, s: Settings, role: str = "target") -> Target:
    """A model name or a recipe path (its model at its resolution, unless --res is given)."""
    if arg.endswith((".yaml", ".yml")):
        from repro.recipe import RecipeError, load_recipe

        try:
            r = load_recipe(arg)
        except RecipeError as e:
            raise BenchError(str(e)) from None
        name, kwargs = r.model.name, dict(r.model.kwargs)
        kwargs["num_classes"] = r.model.num_classes
        res = s.res or r.data.resolution
        if not timm.is_model(name):
            raise BenchError(f"{arg}: model.name {name!r} is not a registered model")
        return Target(f"{name} ({Path(arg).name})", name, res, batch_for(name, s), role, kwargs,
                      arg)
    if not timm.is_model(arg):
        near = timm.list_models(f"*{arg}*")[:5]
        raise BenchError(f"unknown model {arg!r}" + (f" (did you mean {', '.join(near)}?)"
                                                      if near else ""))
    return Target(arg, arg, res_for(arg, s), batch_for(arg, s), role)


def apply_protocol(s: Settings, explicit: set[str]) -> Settings:
    """Fill in `--protocol levit`; an explicit option that contradicts it is an error."""
    if s.protocol is None:
        return s
    fixed: dict = {"fuse_bn": True}
    if s.device == "cpu":
        fixed.update(threads=1, batch=16, amp=None)
    else:
        fixed.update(amp="fp16")  # speed_test.py: torch.cuda.amp.autocast(), i.e. float16
    for key, value in fixed.items():
        if key in explicit and getattr(s, key) != value:
            raise BenchError(f"--protocol levit sets {key.replace('_', '-')} to {value} on "
                             f"{s.device}; drop --{key.replace('_', '-')}")
    timing = {k: v for k, v in LEVIT_TIMING.items() if k not in explicit}
    notes = [f"protocol levit ({paper_info('levit')['timing_protocol']}): " + (
        "CPU, 1 thread, batch 16, fp32" if s.device == "cpu" else
        "GPU, AMP (fp16), batch 2048 (1024 for LeViT-384; speed_test.py's table)")
        + ", BatchNorm fused",
        "not torch.jit.trace as speed_test.py (deprecated in torch 2.x): eager"
        + (" + torch.compile" if s.compile else ""),
        "speed_test.py: 10 s warm-up, mean step time over 60 s; here: median of timed windows"]
    return replace(s, **fixed, **timing, notes=[*s.notes, *notes])


def bench(targets: list[str], s: Settings, references: list[str] = (), log=print) -> dict:
    """Time `targets` and `references` interleaved; the JSON-able record of the run."""
    start = time.perf_counter()
    if s.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but no CUDA device is available")
    if s.fuse_bn and s.mode == "train":
        raise BenchError("--fuse-bn folds BatchNorm for inference; it needs --mode infer")
    if s.amp == "fp16" and s.device == "cpu":
        raise BenchError("--amp fp16 is for CUDA; use bf16 on CPU")
    if s.repeats < 1 or s.attempts < 1:
        raise BenchError("--repeats and --attempts must be >= 1")
    if s.mode == "train" and s.amp == "fp16":
        s = replace(s, notes=[*s.notes, "fp16 training steps without a GradScaler (speed only)"])
    threads_before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as timm's benchmark.py
    try:
        resolved = [resolve_target(a, s) for a in targets]
        resolved += [resolve_target(a, s, "reference") for a in references]
        labels = [t.label for t in resolved]
        if len(set(labels)) != len(labels):
            raise BenchError(f"a model is given twice: {', '.join(labels)}")
        items = []
        for t in resolved:
            log(f"  building {t.label} (res {t.res}, batch {t.batch})")
            items.append(model_item(t, s, log))
        peak = matmul_item(s.device, peak_dtype(s.amp), window_s=min(1.0, s.window_s))
        raw, budget_left = interleave([*items, peak], s, log)
        record = summarise_run(items, peak, raw, s)
        record["retry_budget_left_s"] = budget_left
    finally:
        torch.set_num_threads(threads_before)
    record["total_s"] = time.perf_counter() - start
    return record


def summarise_run(items: list[Item], peak: Item, raw: dict, s: Settings) -> dict:
    """Figures per model (with MFU and memory), ratios to references, load and environment."""
    peak_sum = summarise(raw[peak.key])
    peak_flops = peak_sum["median"]
    results = []
    for item in items:
        fig = summarise(raw[item.key])
        info = dict(item.info)
        results.append({
            **info, "throughput/images_per_s": fig["median"],
            "throughput/images_per_s_min": fig["min"], "throughput/images_per_s_max": fig["max"],
            "time/step_ms": 1e3 * info["batch"] / fig["median"],
            "mfu_pct": 100 * info["flops_per_image"] * fig["median"] / peak_flops,
            **({"memory/max_allocated_gib": fig["memory/max_allocated_gib"]}
               if "memory/max_allocated_gib" in fig else {}),
            "timing": fig, "raw": raw[item.key]})
    refs = [r["label"] for r in results if r["role"] == "reference"]
    ratios = {f"{r['label']} / {ref}": ratio(raw, r["label"], ref)
              for r in results if r["role"] == "target" for ref in refs}
    keys = [i.key for i in items] + [peak.key]
    return {
        "settings": asdict(s),
        "machine": machine(s.device),
        "versions": {**versions(("torch", "timm")), **torch_backends(), **thread_env()},
        "matmul_peak": {**peak.info, "gflops": peak_flops / 1e9,
                        "gflops_min": peak_sum["min"] / 1e9, "gflops_max": peak_sum["max"] / 1e9,
                        "timing": peak_sum, "raw": raw[peak.key]},
        "results": results, "ratios": ratios,
        "other_load": other_load(raw, keys, s.quiet_pct),
    }
