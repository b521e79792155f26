"""One prepared GPU check: the suite's whole GPU path in one command, figures written.

    python benchmarks/gpu_check.py              # (make gpu-check) one CUDA GPU, ~8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny --out runs/gpu_check_tiny.md

Writes `reports/gpu_check.md` and the raw record beside it (`reports/gpu_check.json`):

1. Training on the GPU path, per family (CoAtNet-0, LeViT-256, CvT-13, ViT_C-18GF): the recipe's
   model, optimizer, schedule, loss (LeViT: with its distillation teacher, untrained here), EMA
   and augmentation, built by the trainer's own `repro.train.run.build` and stepped by its
   `train_one_epoch`, with `train.amp=bf16`, `train.channels_last=true` and
   `train.compile=true`, under a one-process NCCL group (so DDP wraps the model, as on a
   cluster), reading the built-in digits through the FFCV pipeline (`ToDevice`; the auto-augment
   policy, flip, normalisation and random erasing on the GPU: repro.data.augment.TrainTail) at
   the recipe's resolution and at the recipe's per-GPU micro-batch (its global batch over
   `launch.nodes x launch.gpus_per_node`). Recorded: the loss of every step (finite? falling?),
   the first step's time beyond a steady step (torch.compile + cuDNN autotuning), the steady
   step time and images/s, the share of it spent waiting for data (`time/data_pct`, the
   trainer's own), MFU against a bf16 matmul timed in the same run, peak memory, and one
   evaluation of the trained weights through the FFCV validation pipeline.
2. Inference speed under the LeViT paper's protocol (`repro bench --protocol levit --device
   cuda`: AMP, batch 2048, 1024 for LeViT-384, BatchNorm fused) for the five LeViTs and the
   distilled DeiT-Tiny/Small of its Table 3; each beside the paper's V100 figure (ratio), its
   ratio to LeViT-256 here and in the paper, and timm's RTX 4090/3090 figures as context
   (repro/papers/anchors/timm_benchmarks.yaml). Timing windows are shorter than speed_test.py's
   10 s + 60 s, to fit the check in minutes (the report says so).
3. The device augmentation alone: ms per 256-image batch at 224 px for every distinct training
   tail the recipes use.

Without a CUDA device it prints one line and exits with status 3, writing nothing.
`--device cpu --tiny` runs the same code at tiny sizes on the CPU (gloo instead of NCCL, and
torch.compile's eager backend: Dynamo captures the graphs, DDP's included, but no code is
generated, since inductor's C++ build takes minutes per model on two cores; `--compile-backend
aot_eager` also traces the backward). tests/test_gpu_check.py runs it, so the script's logic is
exercised in CI. Its figures are not
GPU measurements, and it never writes to reports/ unless told to with --out.

Exit status: 0 when every part ran and every loss stayed finite, 1 otherwise (the report still
says what ran), 2 on bad options, 3 without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "reports" / "gpu_check.md"
TINY_OUT = ROOT / "runs" / "gpu_check_tiny.md"
NO_CUDA = 3

# (paper row, recipe): one recipe per family, the rows the issue names.
FAMILIES = (("CoAtNet-0", "recipes/coatnet_0.yaml"), ("LeViT-256", "recipes/levit_256.yaml"),
            ("CvT-13", "recipes/cvt_13.yaml"), ("ViT_C-18GF", "recipes/earlyconv_vitb.yaml"))
LEVIT_ROWS = ("LeViT-128S", "LeViT-128", "LeViT-192", "LeViT-256", "LeViT-384")
DEIT_ROWS = ("DeiT-Tiny", "DeiT-Small")
ANCHOR_ROW = "LeViT-256"
# The digits' validation split is 360 images: 3 equal batches, so a compiled model meets one
# evaluation shape (a last, smaller batch would compile a second graph).
EVAL_BATCH = 120
IMAGENET_MEAN = (0.485, 0.456, 0.406)
KEPT_LOADERS: list = []
# Where in the --budget-s each part must have started by (part 2 takes ~1.5 min, part 3 ~10 s).
BUDGET_S = 480.0  # the "under 8 minutes on one GPU"
BUDGET_SHARE = {"train": 0.6, "bench": 0.85, "augment": 0.97}


@dataclass(frozen=True)
class Sizes:
    """How big each part is: the full check on a GPU, or `--tiny` on a CPU."""

    steps: int  # optimizer steps per family
    res: int | None  # None: the recipe's resolution
    batch: int | None  # None: the recipe's per-GPU micro-batch
    bench_res: int | None  # None: the protocol's (224)
    bench_batch: int | None  # None: the protocol's (2048; 1024 for LeViT-384)
    bench_warmup_s: float
    bench_window_s: float
    bench_repeats: int
    aug_batch: int
    aug_res: int
    aug_calls: int
    peak_n: int | None  # matmul side for the MFU denominator (None: repro.measure's)
    compile_backend: str  # inductor on the GPU; eager with --tiny (C++ codegen takes minutes)


FULL = Sizes(steps=30, res=None, batch=None, bench_res=None, bench_batch=None,
             bench_warmup_s=3.0, bench_window_s=2.0, bench_repeats=3, aug_batch=256,
             aug_res=224, aug_calls=10, peak_n=None, compile_backend="inductor")
TINY = Sizes(steps=4, res=32, batch=8, bench_res=64, bench_batch=2, bench_warmup_s=0.2,
             bench_window_s=0.2, bench_repeats=2, aug_batch=16, aug_res=64, aug_calls=3,
             peak_n=256, compile_backend="eager")


class CheckError(Exception):
    """Bad options: one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (the check), or cpu with --tiny (the script's own test)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny sizes (32 px, batch 8, 4 steps; short timing windows)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown report; its JSON is written beside it (default "
                   f"{DEFAULT_OUT.relative_to(ROOT)}; with --tiny {TINY_OUT.relative_to(ROOT)})")
    p.add_argument("--parts", default="train,bench,augment",
                   help="comma-separated parts to run (default: all)")
    p.add_argument("--families", default=",".join(f for f, _ in FAMILIES),
                   help="comma-separated family rows of part 1 (default: all four)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per family")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"skip what would start too late to end within this many seconds "
                   f"(default {BUDGET_S:g}, none with --tiny; 0: none): part 1's next family "
                   "after 0.6 x it, part 2 after 0.85 x, part 3 after 0.97 x")
    p.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"),
                   default=None, help="torch.compile backend of part 1 (default: inductor; "
                   "--tiny: eager)")
    return p.parse_args(argv)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------
# The MFU denominator


def matmul_peak(device: str, dtype: torch.dtype, n: int | None, windows: int = 3) -> dict:
    """FLOP/s of a large square matmul on this device and dtype: the median of `windows`
    timed windows of `repro.measure.steps.matmul_item` (the same peak `repro bench` uses)."""
    from repro.measure.steps import matmul_item

    item = matmul_item(device, dtype, n=n)
    k = 1
    while True:  # steps per window: about 0.5 s
        t0 = time.perf_counter()
        item.run(k)
        if time.perf_counter() - t0 > 0.5 or k >= 1 << 14:
            break
        k *= 2
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        flops = item.run(k)
        rates.append(flops / (time.perf_counter() - t0))
    return {"flops_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "n": item.info["n"], "dtype": item.info["dtype"], "steps_per_window": k}


# ------------------------------------------------------------------------------------------
# Part 1: training on the GPU path


def family_recipe(label: str, path: str, sizes: Sizes, device: str):
    """The recipe as the check runs it, and what it changed (every override is recorded)."""
    from repro.recipe import derive, load_recipe

    base = load_recipe(ROOT / path)
    planned = base.launch.nodes * base.launch.gpus_per_node
    per_gpu = derive(base, planned).micro_batch
    batch = sizes.batch or per_gpu
    res = sizes.res or base.data.resolution
    overrides = [
        "data.dataset=digits", "data.format=ffcv", "data.train_images=null",
        "model.num_classes=10", f"data.resolution={res}", f"eval.resolution={res}",
        f"data.batch_size={batch}", f"train.global_batch={batch}",
        f"eval.batch_size={EVAL_BATCH}", "train.max_steps=null", "train.log_every_steps=1",
        f"data.workers={max(1, min(8, len(os.sched_getaffinity(0))))}",
        "train.amp=bf16", "train.channels_last=true", "train.compile=true",
        f"train.compile_backend={sizes.compile_backend}",
        f"train.device={device}",
    ]
    recipe = load_recipe(ROOT / path, overrides)
    return recipe, {"planned_gpus": planned, "recipe_per_gpu_batch": per_gpu,
                    "recipe_global_batch": base.train.global_batch,
                    "recipe_resolution": base.data.resolution, "overrides": overrides}


def train_family(label: str, path: str, sizes: Sizes, env, steps: int, peak: dict,
                 log) -> dict:
    """Build the family's recipe with the trainer's own code, step it, evaluate once."""
    from repro.train.loop import RunState, train_one_epoch
    from repro.train.run import build, complexity, evaluate_all

    recipe, facts = family_recipe(label, path, sizes, env.device.type)
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    setup = build(recipe, env, smoke=True, load_parent=False)  # smoke: an absent teacher file
    build_s = time.perf_counter() - t_build
    d, loaders = setup.derived, setup.loaders
    rec = {"row": label, "recipe": path, "model": recipe.model.name,
           "resolution": recipe.data.resolution, "batch": d.micro_batch,
           "accum_steps": d.accum_steps, "lr": d.lr, "world_size": env.world_size,
           "backend": env.backend, "ddp": env.distributed, "amp": recipe.train.amp,
           "channels_last": recipe.train.channels_last, "compile": recipe.train.compile,
           "compile_backend": recipe.train.compile_backend, "data_format": loaders.format,
           "augment": _tail_name(recipe),
           "device_augmentation": getattr(loaders.train, "augment", None) is not None,
           "teacher": recipe.distill.teacher, "teacher_note": setup.teacher_note,
           "not_applied": loaders.not_applied, "deviations": loaders.deviations,
           "build_s": build_s, **facts,
           **complexity(recipe, loaders.num_classes, setup.unwrapped)}
    log(f"  {label}: {recipe.model.name} at {rec['resolution']} px, batch {d.micro_batch}, "
        f"{steps} steps")
    times, losses, data_pct = [], [], []
    state = RunState()
    last = [0.0]

    def on_step(st: RunState, metrics: dict) -> bool:
        sync(env.device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        losses.append(metrics["train/loss"])
        data_pct.append(metrics["time/data_pct"])
        return len(times) < steps

    last[0] = time.perf_counter()
    while len(times) < steps:
        before = len(times)
        train_one_epoch(setup.model, loaders.train.epoch(state.epoch), setup.optimizer,
                        setup.scheduler, setup.loss_fn, state, setup.step,
                        steps=d.steps_per_epoch, unwrapped=setup.unwrapped, on_step=on_step)
        if len(times) == before:
            raise RuntimeError(f"{path}: an epoch of the digits gave no step at batch "
                               f"{d.micro_batch}")
        state.epoch += 1
        state.batch_in_epoch = 0
        last[0] = time.perf_counter()  # the next epoch's loader start is not a step
    rec.update(_step_figures(times, losses, data_pct, rec, peak))
    t_eval = time.perf_counter()
    evals = evaluate_all(setup.model, setup.ema, loaders, env, recipe.train)
    rec["eval_s"] = time.perf_counter() - t_eval
    rec["eval"] = evals
    if cuda:
        rec["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        import resource

        rec["memory/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # FFCV's compiled pipelines stay alive to the end: numba's finalizer raises (and prints)
    # a KeyError when one is collected mid-process. The model, optimizer and EMA go now.
    KEPT_LOADERS.append(setup.loaders)
    del setup
    _release(cuda)
    return rec


def _step_figures(times, losses, data_pct, rec: dict, peak: dict) -> dict:
    """Loss verdicts, compile time, steady step time, images/s, data share and MFU."""
    n = len(times)
    skip = min(max(2, n // 5), n - 1)  # compile, autotuning and the first DDP step
    steady = times[skip:]
    data_s = [t * p / 100 for t, p in zip(times, data_pct, strict=True)]
    compute = [t - s for t, s in zip(times, data_s, strict=True)]
    step_s = statistics.median(steady)
    k = max(1, n // 4)
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    ips = rec["batch"] / step_s
    flops = 3 * 2 * rec["gmacs"] * 1e9 if rec.get("gmacs") else None  # forward + backward
    return {
        "steps": n, "losses": losses, "step_s": times, "data_pct": data_pct,
        "loss_finite": all(math.isfinite(x) for x in losses),
        "loss_first": first, "loss_last": last, "loss_falling": last < first,
        "first_step_s": times[0],
        "compile_s": compute[0] - statistics.median(compute[skip:]),
        "steady_from_step": skip + 1, "time/step_ms": 1e3 * step_s,
        "throughput/images_per_s": ips,
        "time/data_pct": statistics.median(data_pct[skip:]),
        "mfu_pct": 100 * flops * ips / peak["flops_per_s"] if flops else None,
    }


def _release(cuda: bool) -> None:
    torch._dynamo.reset()  # each family compiles afresh; no cache limit shared between them
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _tail_name(recipe, mixup: bool = True) -> str:
    """The recipe's training augmentation in a few words (the device tail; Mixup/CutMix too
    unless `mixup` is False)."""
    a = recipe.aug
    parts = [a.auto_augment or (f"color jitter {a.color_jitter:g}" if a.color_jitter
                                else "no policy")]
    if a.re_prob:
        parts.append(f"RE {a.re_prob:g} {a.re_mode} x{a.re_count}")
    if mixup and (a.mixup or a.cutmix):
        parts.append(f"mixup {a.mixup:g} / cutmix {a.cutmix:g}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# Part 2: the LeViT protocol


def levit_rows(anchors: dict) -> dict:
    """The paper's Table 3 rows: timm model and V100 images/s (levit.yaml), and timm's
    figures for the same models (`anchors`: repro.papers.anchor_speeds())."""
    from repro import papers

    rows = {}
    for name in LEVIT_ROWS + DEIT_ROWS:
        r = papers.get_row(f"levit/{name}")
        (v100,) = [t for t in r["throughput"] if t["device_type"] == "gpu"]
        rows[name] = {"timm_model": r["timm_model"], "paper_v100": v100["images_per_s"],
                      "paper_device": v100["device"], "paper_batch": v100["batch"],
                      "source": v100["source"],
                      **{f"timm_{k}": dev["models"].get(r["timm_model"], {}).get("images_per_s")
                         for k, dev in anchors["devices"].items()}}
    return rows


def bench_levit(sizes: Sizes, device: str, log) -> dict:
    """`repro bench --protocol levit` over the Table 3 rows, LeViT-256 as the reference."""
    from repro.measure import throughput as tp
    from repro.papers import anchor_speeds

    anchors = anchor_speeds()
    paper = levit_rows(anchors)
    s = tp.apply_protocol(tp.Settings(
        device=device, protocol="levit", warmup_s=sizes.bench_warmup_s,
        window_s=sizes.bench_window_s, repeats=sizes.bench_repeats, attempts=1,
        retry_budget_s=10.0), explicit={"warmup_s", "window_s", "repeats"})
    notes = [f"timing shortened to fit the check: {sizes.bench_warmup_s:g} s warm-up, "
             f"{sizes.bench_repeats} x {sizes.bench_window_s:g} s windows (speed_test.py: 10 s "
             "+ 60 s)"]
    if sizes.bench_batch or sizes.bench_res:
        s = replace(s, batch=sizes.bench_batch, res=sizes.bench_res)
        notes.append(f"--tiny: batch {sizes.bench_batch}, {sizes.bench_res} px (not the "
                     "protocol's)")
    s = replace(s, notes=[*s.notes, *notes])
    anchor = paper[ANCHOR_ROW]["timm_model"]
    targets = [paper[r]["timm_model"] for r in LEVIT_ROWS + DEIT_ROWS if r != ANCHOR_ROW]
    record = tp.bench(targets, s, [anchor], log)
    by_model = {r["model"]: r for r in record["results"]}
    rows = []
    for name in LEVIT_ROWS + DEIT_ROWS:
        pr, r = paper[name], by_model[paper[name]["timm_model"]]
        here = r["throughput/images_per_s"]
        paired = record["ratios"].get(f"{r['label']} / {by_model[anchor]['label']}")
        rows.append({
            "row": name, "model": pr["timm_model"], "batch": r["batch"], "res": r["res"],
            "here": here, "here_min": r["throughput/images_per_s_min"],
            "here_max": r["throughput/images_per_s_max"], "paper_v100": pr["paper_v100"],
            "vs_paper_v100": here / pr["paper_v100"],
            "ratio_to_anchor_here": paired["of_medians"] if paired else 1.0,
            "ratio_to_anchor_paper": pr["paper_v100"] / paper[ANCHOR_ROW]["paper_v100"],
            "timm_rtx4090": pr.get("timm_rtx4090"), "timm_rtx3090": pr.get("timm_rtx3090"),
            "mfu_pct": r["mfu_pct"], "memory_gib": r.get("memory/max_allocated_gib"),
            "source": pr["source"]})
    return {"rows": rows, "paper": paper, "record": record, "timm_source": anchors["source"]}


# ------------------------------------------------------------------------------------------
# Part 3: the device augmentation alone


def recipe_tails() -> dict:
    """Every distinct training tail (policy, jitter, erasing, interpolation, mean/std) the
    recipes use, with the recipes that use it."""
    from repro.recipe import load_recipe

    tails: dict = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        a, d = r.aug, r.data
        key = (a.auto_augment, a.color_jitter if not a.auto_augment else None, a.re_prob,
               a.re_mode if a.re_prob else None, a.re_count if a.re_prob else None,
               d.interpolation, tuple(d.mean), tuple(d.std), d.hflip)
        name = _tail_name(r, mixup=False) + f"; {d.interpolation}"
        if tuple(d.mean) != IMAGENET_MEAN:
            name += f", mean {'/'.join(f'{m:g}' for m in d.mean)}"
        tails.setdefault(key, {"name": name, "recipes": []})
        tails[key]["recipes"].append(path.stem)
    return tails


def time_augment(sizes: Sizes, device: str, log) -> list[dict]:
    """ms per batch of each tail on the device (uint8 digits in, normalised float out)."""
    from repro.data.augment import TrainTail
    from repro.data.builtin import digits_arrays

    images, _ = digits_arrays(sizes.aug_res)
    reps = -(-sizes.aug_batch // len(images))
    batch = torch.from_numpy(images).repeat(reps, 1, 1, 1)[:sizes.aug_batch]
    batch = batch.permute(0, 3, 1, 2).contiguous().to(device)
    out = []
    for key, tail_info in recipe_tails().items():
        policy, jitter, re_prob, re_mode, re_count, interp, mean, std, hflip = key
        tail = TrainTail(auto_augment=policy, color_jitter=jitter, interpolation=interp,
                         mean=mean, std=std, re_prob=re_prob, re_mode=re_mode or "pixel",
                         re_count=re_count or 1, hflip=hflip)
        if not tail.active:  # the loader leaves flip and normalisation to FFCV's pipeline
            out.append({**tail_info, "active": False})
            continue
        for seed in range(2):  # warm-up: kernels compiled, buffers made
            tail(batch, seed)
        sync(device)
        ms = []
        for seed in range(sizes.aug_calls):
            t0 = time.perf_counter()
            y = tail(batch, 100 + seed)
            sync(device)
            ms.append(1e3 * (time.perf_counter() - t0))
        finite = bool(torch.isfinite(y).all())
        log(f"  {tail_info['name']}: {statistics.median(ms):.1f} ms per {sizes.aug_batch}")
        out.append({**tail_info, "active": True, "policy": policy, "color_jitter": jitter,
                    "re_prob": re_prob, "interpolation": interp, "batch": sizes.aug_batch,
                    "res": sizes.aug_res,
                    "ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms),
                    "calls": sizes.aug_calls, "output_finite": finite,
                    "output_shape": list(y.shape), "backend": _backend(tail, batch)})
    return out


def _backend(tail, batch) -> str:
    from repro.data.augment_ops import cpu_kernels

    hp = tail.hparams(batch.shape[2], batch.shape[3], batch.device)
    return "numba kernels (CPU)" if cpu_kernels(batch, hp) is not None else \
        f"torch ops ({batch.device.type})"


# ------------------------------------------------------------------------------------------
# The report


def _f(v, fmt: str = ".1f", none: str = "–") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else \
        format(v, fmt)


def _table(head: list[str], rows: list[list]) -> list[str]:
    from tabulate import tabulate

    return tabulate(rows, headers=head, tablefmt="github", disable_numparse=True).splitlines()


def render(rep: dict) -> str:
    env, tiny = rep["environment"], rep["tiny"]
    dev = env["machine"].get("gpu") or env["machine"].get("cpu")
    lines = ["# GPU check", ""]
    if tiny:
        lines += ["> **A `--tiny` run on the CPU.** It exercises the check's code paths at tiny "
                  "sizes (gloo, not NCCL); none of its figures is a GPU measurement.", ""]
    lines += [f"`{rep['command']}` on {dev}; torch {env['versions'].get('torch')}, timm "
              f"{env['versions'].get('timm')}, ffcv {env['versions'].get('ffcv')}"
              + (f", CUDA {env['backends'].get('cuda')}, cuDNN {env['backends'].get('cudnn')}"
                 f", NCCL {env.get('nccl')}" if env.get("nccl") else "")
              + f"; commit {str(env['git'].get('commit'))[:10]}"
              + (" (with uncommitted changes)" if env["git"].get("dirty") else "")
              + f"; {rep['total_s']:.0f} s in all.", ""]
    if rep.get("skipped"):
        lines += [f"**Skipped to stay within the {rep['budget_s']:g} s budget:** "
                  f"{', '.join(rep['skipped'])} (rerun with --parts / --families).", ""]
    for part, error in rep["errors"].items():
        lines += [f"**{part} failed:** `{error.splitlines()[-1]}` (traceback in the JSON)", ""]
    peak = rep.get("peak")
    if "train" in rep:
        lines += _render_train(rep["train"], peak)
    if "bench" in rep:
        lines += _render_bench(rep["bench"])
    if "augment" in rep:
        lines += _render_augment(rep["augment"])
    return "\n".join(lines).rstrip() + "\n"


def _render_train(fams: list[dict], peak: dict | None) -> list[str]:
    lines = ["## 1. Training on the GPU path", ""]
    ran = [f for f in fams if "loss_first" in f]
    if ran:
        f = ran[0]
        lines += [
            f"Each family's recipe, built by `repro.train.run.build` and stepped by "
            f"`train_one_epoch`: amp {f['amp']}, channels_last {f['channels_last']}, "
            f"torch.compile {f['compile']} ({f['compile_backend']}), a one-process "
            f"{f['backend']} group (DDP "
            f"{'on' if f['ddp'] else 'off'}), the built-in digits through the "
            f"{f['data_format']} pipeline with the recipe's augmentation on the training device. "
            "Each row's batch is the recipe's per-GPU micro-batch (global batch over "
            "launch.nodes x gpus_per_node) and its lr follows the recipe's lr_batch rule at "
            "that batch; warm-up and schedule are the recipe's, measured in digits epochs. "
            f"Evaluation batch {EVAL_BATCH} (360 validation images: one compiled shape).", ""]
    head = ["row (model)", "res", "batch", "loss first → last", "falling", "compile s",
            "step ms", "img/s", "data %", "MFU %", "peak GiB", "eval top-1"]
    rows = []
    for f in fams:
        if f.get("skipped"):
            rows.append([f"{f['row']}", "", "", "skipped (budget)"] + [""] * 8)
            continue
        if "error" in f:
            rows.append([f"{f['row']}", "", "", f"failed: {f['error'].splitlines()[-1]}"]
                        + [""] * 8)
            continue
        mem = f.get("memory/max_allocated_gib", f.get("memory/max_rss_gib"))
        rows.append([
            f"{f['row']} (`{f['model']}`)", f["resolution"], f["batch"],
            f"{f['loss_first']:.3f} → {f['loss_last']:.3f}"
            + ("" if f["loss_finite"] else " (NOT FINITE)"),
            "yes" if f["loss_falling"] else "**no**", _f(f["compile_s"]),
            _f(f["time/step_ms"]), _f(f["throughput/images_per_s"], ".0f"),
            _f(f["time/data_pct"]), _f(f["mfu_pct"]), _f(mem, ".2f"),
            _f(f["eval"].get("eval/top1"))])
    lines += _table(head, rows) + [""]
    if peak:
        lines += [f"- MFU: 3 x 2 x GMACs per image (forward + backward; the LeViT teacher's "
                  f"forward not counted) x images/s over a {peak['n']}² {peak['dtype']} matmul "
                  f"timed in this run: {peak['flops_per_s'] / 1e12:.1f} TFLOP/s.",
                  "- compile s: the first step's compute beyond a steady step's "
                  "(torch.compile of forward and backward, cuDNN autotuning), its data wait "
                  "excluded. Steady figures are medians from step "
                  f"{ran[0]['steady_from_step'] if ran else '?'} on.",
                  "- data %: the trainer's own `time/data_pct` (time waiting for the next batch, "
                  "device augmentation included, over the step's wall time). The digits are "
                  "stored at the training resolution, so decoding is lighter than ImageNet's "
                  "~400 px JPEGs: on ImageNet the share can only be higher.",
                  "- falling: mean loss of the last quarter of steps below the first quarter's "
                  "(the recipe's warm-up holds the lr low in the first steps)."]
    for f in fams:
        if f.get("teacher_note"):
            lines.append(f"- {f['row']}: {f['teacher_note']}.")
    return lines + [""]


def _render_bench(b: dict) -> list[str]:
    rec = b["record"]
    s = rec["settings"]
    lines = ["## 2. Inference under the LeViT protocol", "",
             f"`repro bench --protocol levit --device {s['device']}`: "
             f"{'AMP ' + s['amp'] if s['amp'] else 'fp32'}, BatchNorm "
             f"fused, eager. " + " ".join(n.rstrip(".") + "." for n in s["notes"]), ""]
    head = ["row (timm model)", "batch", "img/s here (min–max)", "paper V100", "here / V100",
            f"/ {ANCHOR_ROW} here", f"/ {ANCHOR_ROW} paper", "timm RTX 4090", "timm RTX 3090",
            "MFU %"]
    rows = [[f"{r['row']} (`{r['model']}`)", r["batch"],
             f"{r['here']:.0f} ({r['here_min']:.0f}–{r['here_max']:.0f})",
             f"{r['paper_v100']:g}", f"{r['vs_paper_v100']:.2f}",
             f"{r['ratio_to_anchor_here']:.2f}", f"{r['ratio_to_anchor_paper']:.2f}",
             _f(r["timm_rtx4090"], ".0f"), _f(r["timm_rtx3090"], ".0f"), _f(r["mfu_pct"])]
            for r in b["rows"]]
    lines += _table(head, rows) + [""]
    lines += ["- Paper: LeViT paper Table 3 (V100, AMP, batch 2048, 1024 for LeViT-384, "
              "PyTorch ~1.7, torch.jit.trace), via `repro/papers/levit.yaml`.",
              f"- / {ANCHOR_ROW}: each model's speed over LeViT-256's, windows paired in time "
              "here; the paper's from its own table. The ratio travels between GPUs far better "
              "than the absolute figure.",
              "- timm: " + b.get("timm_source", "") + " — context only: batch 1024, fp16 "
              "autocast, PyTorch 2.4, not the paper's protocol.",
              f"- Load: {'quiet' if rec['other_load']['quiet'] else 'NOT quiet'} (others' CPU "
              f"use at most {rec['other_load']['max_pct']:.1f} % of a window)."]
    return lines + [""]


def _render_augment(all_rows: list[dict]) -> list[str]:
    rows = [r for r in all_rows if r["active"]]
    if not rows:
        return []
    r0 = rows[0]
    lines = ["## 3. Device augmentation alone", "",
             f"`repro.data.augment.TrainTail` on {r0['batch']} uint8 digits images of "
             f"{r0['res']} px already on the device ({r0['backend']}): flip, the policy, "
             "normalisation, random erasing; median of "
             f"{r0['calls']} calls after 2 warm-up calls.", ""]
    head = ["training tail", "ms per batch (min–max)", "ms per image", "recipes"]
    body = []
    for r in rows:
        names = r["recipes"]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        body.append([f"`{r['name']}`", f"{r['ms_median']:.2f} ({r['ms_min']:.2f}–"
                     f"{r['ms_max']:.2f})", f"{r['ms_median'] / r['batch']:.3f}", shown])
    idle = sorted(n for r in all_rows if not r["active"] for n in r["recipes"])
    if idle:
        body_end = [f"- No device augmentation (no policy, jitter or erasing; FFCV's own flip and "
                    f"normalisation): {', '.join(idle)}."]
    else:
        body_end = []
    return lines + _table(head, body) + [""] + body_end + [""]


# ------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    from repro.measure.machine import git_commit, machine, torch_backends, versions

    nccl = None
    if device == "cuda":
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {"machine": machine(device), "versions": versions(("torch", "timm", "ffcv")),
            "backends": torch_backends(), "git": git_commit(), "nccl": nccl}


def process_group(device: str):
    """A one-process group (NCCL on the GPU, gloo on the CPU), as torchrun would set it up."""
    from repro.train import distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(var, value)
    if os.environ["WORLD_SIZE"] != "1":
        raise CheckError("gpu_check runs as one process (WORLD_SIZE=1), not under torchrun")
    return distributed.setup(device, group=True)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda or 'none'}): nothing run, nothing written; "
                  "`--device cpu --tiny` exercises the script on the CPU", file=sys.stderr)
            return NO_CUDA
        if args.device == "cpu" and not args.tiny:
            raise CheckError("--device cpu needs --tiny (the full sizes are for a GPU)")
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        if unknown := set(parts) - {"train", "bench", "augment"}:
            raise CheckError(f"--parts: unknown {', '.join(sorted(unknown))} (train, bench, "
                             "augment)")
        known = dict(FAMILIES)
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        if unknown := [f for f in families if f not in known]:
            raise CheckError(f"--families: unknown {', '.join(unknown)} ({', '.join(known)})")
        sizes = TINY if args.tiny else FULL
        steps = args.steps or sizes.steps
        if args.budget_s is None and not args.tiny:
            args.budget_s = BUDGET_S
        args.budget_s = args.budget_s or None  # 0: no budget
        if args.compile_backend:
            sizes = replace(sizes, compile_backend=args.compile_backend)
        if steps < 3:
            raise CheckError("--steps must be at least 3 (a compile step and steady steps)")
        out = (args.out or (TINY_OUT if args.tiny else DEFAULT_OUT)).resolve()
        if args.tiny and out == DEFAULT_OUT.resolve():
            raise CheckError(f"--tiny does not write {DEFAULT_OUT.relative_to(ROOT)}: its "
                             "figures are not GPU measurements")
    except CheckError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2

    from repro.io import atomic_write_json, atomic_write_text
    from repro.train import distributed

    device = args.device
    rep: dict = {"command": shlex.join(["python", "benchmarks/gpu_check.py",
                                        *(sys.argv[1:] if argv is None else argv)]),
                 "tiny": args.tiny, "sizes": asdict(sizes), "steps": steps,
                 "environment": environment(device), "errors": {}, "part_s": {},
                 "budget_s": args.budget_s, "skipped": []}

    def over_budget(part: str) -> bool:
        """Whether `part` (or its next family) starts too late to end within --budget-s: a
        lent GPU's minutes are few, and a check cut off by a timeout would write nothing."""
        return args.budget_s is not None and \
            time.perf_counter() - t_start > BUDGET_SHARE[part] * args.budget_s
    if "train" in parts:
        t0 = time.perf_counter()
        log("1. training on the GPU path")
        rep["peak"] = matmul_peak(device, torch.bfloat16, sizes.peak_n)
        rep["train"] = []
        try:
            env = process_group(device)
            for label in families:
                if over_budget("train"):
                    rep["skipped"].append(f"part 1: {label}")
                    rep["train"].append({"row": label, "skipped": True})
                    continue
                try:
                    rep["train"].append(train_family(label, known[label], sizes, env, steps,
                                                     rep["peak"], log))
                except Exception:
                    rep["train"].append({"row": label, "error": traceback.format_exc()})
                    _release(device == "cuda")
        except Exception:
            rep["errors"]["train"] = traceback.format_exc()
        finally:
            distributed.teardown()
        rep["part_s"]["train"] = time.perf_counter() - t0
    later = (("bench", 2, "inference under the LeViT protocol",
              lambda: bench_levit(sizes, device, log)),
             ("augment", 3, "device augmentation alone", lambda: time_augment(sizes, device, log)))
    for part, number, title, measure in later:  # each part on its own: one failing is noted
        if part not in parts:
            continue
        if over_budget(part):
            rep["skipped"].append(f"part {number}")
            continue
        t0 = time.perf_counter()
        log(f"{number}. {title}")
        try:
            rep[part] = measure()
        except Exception:
            rep["errors"][part] = traceback.format_exc()
        rep["part_s"][part] = time.perf_counter() - t0
    rep["total_s"] = time.perf_counter() - t_start
    failed = [f["row"] for f in rep.get("train", [])
              if "error" in f or not f.get("loss_finite", True)]
    rep["ok"] = not rep["errors"] and not failed and not rep["skipped"]
    text = render(rep)  # before anything is written: both files or neither
    atomic_write_json(out.with_suffix(".json"), rep)
    atomic_write_text(out, text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.json').name} in {rep['total_s']:.0f} s"
          + (f"; FAILED: {', '.join([*rep['errors'], *failed])}" if rep["errors"] or failed
             else "")
          + (f"; skipped: {', '.join(rep['skipped'])}" if rep["skipped"] else ""))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
