"""`repro bench`: images/s of models, with every setting that moves the figure recorded beside it.

The method is timm's `benchmark.py`: synthetic input, a warm-up, a CUDA synchronisation after
every step, `torch.inference_mode()` for inference, a full step (forward, loss, backward,
optimizer step) for training, and batch halving on out-of-memory. On top of it:
- timed windows instead of one run: each model is warmed up, then timed over `repeats` windows
  of a fixed number of steps (about `window_s` seconds); windows are interleaved across models
  (one window of each per round, the order rotating every round) so that drift on a shared
  machine falls on every model alike; the figure is the median window, min and max beside it;
- other processes' CPU use is read from /proc during every window (the approach of
  benchmarks/data_loading.py); a window in which they took more than `quiet_pct` % of the
  machine is marked disturbed and re-timed once the machine is quiet (`attempts`, within
  `retry_budget_s`);
- MFU: model FLOPs (2 x the multiply-adds `repro.measure.complexity.count` counts per image;
  x3 for a training step) x images/s over the rate of a large `torch.mm` timed on the same
  device, dtype and threads, interleaved with the models;
- reference models timed in the same run, so ratios stand beside absolute figures;
- `--fuse-bn` folds BatchNorm into the convolution or linear layer before it (outputs unchanged);
- `--protocol levit`: the LeViT paper's speed_test.py settings (CPU: 1 thread, batch 16;
  GPU: AMP, batch 2048, 1024 for LeViT-384; BatchNorm fused).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import repro.models  # noqa: F401  (registers the papers' models with timm)
from repro.errors import UserError
from repro.measure.complexity import _create, count_model
from repro.papers import paper_info

QUIET_PCT = 5.0  # a window in which other processes took more of the machine is disturbed
DEFAULT_BATCH = {"cpu": 16, "cuda": 256}
PEAK_N = {"cpu": 2048, "cuda": 8192}  # side of the square matmul timed for MFU

# facebookresearch/LeViT@3772b8e speed_test.py: the paper's timing protocol (Sec 5.1, Table 3).
LEVIT_GPU_BATCH = {"resnet50": 1024, "levit_384": 1024, "efficientnet_b0": 1024,
                   "efficientnet_b1": 1024, "efficientnet_b2": 512, "efficientnet_b3": 512,
                   "efficientnet_b4": 256}  # every other model: 2048
LEVIT_RES = {"efficientnet_b1": 240, "efficientnet_b2": 260, "efficientnet_b3": 300,
             "efficientnet_b4": 380}  # every other model: 224
LEVIT_TIMING = {"warmup_s": 10.0, "window_s": 10.0, "repeats": 6}  # 10 s warm-up, 60 s timed

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


class BenchError(UserError, ValueError):
    """Bad input to `repro bench` (unknown model, conflicting options): one line, exit 1."""


@dataclass
class Settings:
    """How to time: every field is recorded with the figures."""

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
    warmup_s: float = 3.0
    window_s: float = 3.0
    repeats: int = 5
    attempts: int = 3  # tries per window when other processes disturb it
    retry_budget_s: float = 60.0  # most extra seconds spent waiting and re-timing per run
    quiet_pct: float = QUIET_PCT
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


@dataclass
class Item:
    """One thing timed: `run(k)` does k steps and returns the units (images, FLOPs) done."""

    key: str
    run: Callable[[int], float]
    device: str = "cpu"
    unit: str = "images"
    window_s: float | None = None  # None: the run's window
    group: str | None = None  # items of a group time the same number of steps per window
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Other processes' load, from /proc (as benchmarks/data_loading.py measures it)


def _proc_cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of one process, all its threads (0 if it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(task: Path) -> list[str]:
    """The child pids of one of our threads (none if the thread has ended meanwhile)."""
    try:
        return (task / "children").read_text().split()
    except OSError:
        return []


def cpu_snapshot() -> dict:
    """CPU seconds so far: the machine's, the hypervisor's steal, and this process tree's."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    live = [c for task in Path("/proc/self/task").iterdir() for c in _children(task)]
    reaped = os.times().children_user + os.times().children_system
    return {"t": time.perf_counter(), "machine": (user + nice + system + irq + softirq) / tick,
            "steal": steal / tick,
            "ours": _proc_cpu_s("self") + sum(map(_proc_cpu_s, live)) + reaped}


def cpu_use(before: dict, after: dict) -> dict:
    """Shares of the machine's cores between two snapshots: ours, other processes', stolen."""
    capacity = max(after["t"] - before["t"], 1e-9) * (os.cpu_count() or 1)
    ours = after["ours"] - before["ours"]
    other = after["machine"] - before["machine"] - ours
    return {"ours_pct": 100 * ours / capacity, "other_pct": max(0.0, 100 * other / capacity),
            "steal_pct": max(0.0, 100 * (after["steal"] - before["steal"]) / capacity)}


def others_pct(use: dict) -> float:
    """Other processes' and the hypervisor's share of the machine."""
    return use["other_pct"] + use["steal_pct"]


def wait_for_quiet(timeout_s: float, quiet_pct: float = QUIET_PCT, sample_s: float = 0.5) -> dict:
    """Sleep until other processes take at most `quiet_pct` % over `sample_s`, or time runs out."""
    start = time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(sample_s)
        share = others_pct(cpu_use(before, cpu_snapshot()))
        waited = time.perf_counter() - start
        if share <= quiet_pct or waited + sample_s > timeout_s:
            return {"waited_s": waited, "quiet": share <= quiet_pct, "others_pct": share}


# ------------------------------------------------------------------------------------------
# Machine and versions


def machine(device: str = "cpu") -> dict:
    """CPU model, cores, memory (and the GPU when timing on one)."""
    info = {"cpu": platform.processor() or "?", "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "os": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
        info["hypervisor"] = " hypervisor" in cpuinfo  # a VM: steal time is others' load
    except (OSError, StopIteration):
        pass
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}")
    return info


def versions() -> dict:
    """Versions and math back-ends on the timed path."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "timm": timm.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available()}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME"):
        if var in os.environ:  # these change multi-thread timings on a shared machine
            out[var] = os.environ[var]
    return out


# ------------------------------------------------------------------------------------------
# BatchNorm folding


def _fuse_own(module: nn.Module, counts: Counter) -> None:
    """Replace children that know how to fold themselves (`fuse()`), as timm and LeViT do."""
    for name, child in module.named_children():
        fuse = getattr(child, "fuse", None)
        if callable(fuse) and not any(
                p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                for p in inspect.signature(fuse).parameters.values()):
            fused = fuse()
            if isinstance(fused, nn.Module):
                setattr(module, name, fused)
                counts[type(child).__name__] += 1
                child = fused
        _fuse_own(child, counts)


def _set(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _conv_bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where, in the traced graph, the conv's output feeds only that BN."""
    import torch.fx

    leaves = tuple(timm.layers.get_notrace_modules())

    class Tracer(torch.fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(
                f for f in timm.layers.get_notrace_functions() if callable(f)))

        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    graph = Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _BATCHNORMS:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        if _CONVS.get(type(modules[prev.target])) is not type(modules[node.target]):
            continue
        if calls[prev.target] == 1 and calls[node.target] == 1:  # modules used once only
            pairs.append((prev.target, node.target))
    return pairs


def _conv_bn_pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names adjacent in plain nn.Sequential containers (untraceable models)."""
    pairs = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward:
            continue
        kids = list(m.named_children())
        for (a, conv), (b, bn) in zip(kids, kids[1:], strict=False):
            if _CONVS.get(type(conv)) is type(bn):
                pairs.append((f"{name}.{a}" if name else a, f"{name}.{b}" if name else b))
    return pairs


def fuse_bn(model: nn.Module) -> dict:
    """Fold eval-mode BatchNorm into the layer before it, in place; returns what was folded.

    Every fold leaves the outputs unchanged (up to rounding): first the modules that fold
    themselves (`fuse()`: timm's LeViT ConvNorm/LinearNorm/NormLinear, as speed_test.py's
    replace_batchnorm does), then conv -> BatchNorm pairs found in the torch.fx graph (or, when
    the model cannot be traced, adjacent in an nn.Sequential). speed_test.py also turns leftover
    BatchNorm2d into Identity, which changes outputs; that is not done: they are counted instead.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    counts: Counter = Counter()
    with torch.no_grad():
        _fuse_own(model, counts)
    record: dict = {"fuse_methods": dict(counts), "conv_bn_pairs": 0, "pair_method": None}
    if any(isinstance(m, _BATCHNORMS) for m in model.modules()):
        try:
            pairs, record["pair_method"] = _conv_bn_pairs_fx(model), "torch.fx"
        except Exception as e:  # data-dependent control flow and the like
            pairs, record["pair_method"] = _conv_bn_pairs_sequential(model), "nn.Sequential"
            record["trace_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for conv_name, bn_name in pairs:
            bn = model.get_submodule(bn_name)
            if bn.running_mean is None:  # no running statistics: batch statistics at test time
                continue
            _set(model, conv_name, fuse_conv_bn_eval(model.get_submodule(conv_name), bn))
            _set(model, bn_name, nn.Identity())
            record["conv_bn_pairs"] += 1
    record["batchnorm_left"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                   for m in model.modules())
    return record


def describe_fusion(record: dict | None) -> str:
    """One phrase for tables: what --fuse-bn folded."""
    if record is None:
        return "no"
    parts = [f"{n} {k}" for k, n in record["fuse_methods"].items()]
    if record["conv_bn_pairs"]:
        parts.append(f"{record['conv_bn_pairs']} conv+BN ({record['pair_method']})")
    left = f"; {record['batchnorm_left']} BN left" if record["batchnorm_left"] else ""
    return (", ".join(parts) or "nothing to fold") + left


# ------------------------------------------------------------------------------------------
# Timed things


def _autocast(device: str, amp: str | None):
    import contextlib

    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if amp == "bf16"
                          else torch.float16)


def _is_oom(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg \
        or "can't allocate memory" in msg


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def count_gmacs(model: str, res: int, kwargs: dict) -> tuple[float, int]:
    """Multiply-adds per image (GMACs) and parameters, counted on the meta device."""
    with torch.device("meta"):
        meta = _create(model, res, **kwargs)
    c = count_model(meta, res, model)
    return c.gmacs, c.params


def model_item(t: Target, s: Settings, log=print) -> Item:
    """A model ready to time (built, folded, moved, compiled, one step done); OOM halves batch."""
    dev = s.device
    gmacs, params = count_gmacs(t.model, t.res, t.kwargs)
    model = _create(t.model, t.res, **t.kwargs)
    fusion = fuse_bn(model) if s.fuse_bn else None
    model.to(dev)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train(s.mode == "train")
    optimizer = None
    if s.mode == "train":
        from timm.optim import create_optimizer_v2

        optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
    runner = torch.compile(model) if s.compile else model
    num_classes = getattr(model, "num_classes", 1000) or 1000
    batch, state = t.batch, {}

    def make_input(b: int) -> None:
        x = torch.randn(b, 3, t.res, t.res, device=dev)
        state["x"] = x.contiguous(memory_format=torch.channels_last) if s.channels_last else x
        state["y"] = torch.randint(0, num_classes, (b,), device=dev)

    def infer_step() -> None:
        with torch.inference_mode(), _autocast(dev, s.amp):
            runner(state["x"])

    def train_step() -> None:
        with _autocast(dev, s.amp):
            out = runner(state["x"])
            out = out[0] if isinstance(out, tuple) else out
            loss = F.cross_entropy(out, state["y"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = train_step if s.mode == "train" else infer_step
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    while True:
        try:
            make_input(batch)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            first_s = time.perf_counter() - t0
            break
        except RuntimeError as e:
            if not _is_oom(e) or batch == 1:
                raise
            state.clear()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
            log(f"  {t.label}: out of memory at batch {batch}, retrying at {batch // 2}")
            batch //= 2

    def run(k: int) -> float:
        for _ in range(k):
            step()
            _sync(dev)  # timm: every step ends synchronised
        return k * batch

    flops_per_image = 2 * gmacs * 1e9 * (3 if s.mode == "train" else 1)
    info = {"label": t.label, "model": t.model, "role": t.role, "recipe": t.recipe,
            "res": t.res, "batch": batch, "batch_requested": t.batch, "kwargs": t.kwargs,
            "params_m": params / 1e6, "gmacs": gmacs, "flops_per_image": flops_per_image,
            "fusion": fusion, "first_step_s": first_s, **figure_settings(s, batch)}
    if dev == "cpu":  # the process's peak so far (cumulative: models built earlier included)
        info["memory/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return Item(t.label, run, device=dev, info=info)


def figure_settings(s: Settings, batch: int) -> dict:
    """What every figure carries beside it."""
    return {"device": s.device, "threads": torch.get_num_threads(), "batch": batch,
            "dtype": s.dtype, "amp": s.amp, "channels_last": s.channels_last,
            "compile": s.compile, "fuse_bn": s.fuse_bn, "mode": s.mode, "protocol": s.protocol}


def peak_dtype(amp: str | None) -> torch.dtype:
    """The matmul dtype that matches a run's precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "", torch.float32)


def matmul_item(device: str, dtype: torch.dtype, n: int | None = None,
                window_s: float = 1.0) -> Item:
    """A large square `torch.mm` on the run's device, dtype and threads: the MFU denominator."""
    n = n or PEAK_N[device]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)

    def run(k: int) -> float:
        for _ in range(k):
            torch.mm(a, b, out=out)
        _sync(device)
        return k * 2.0 * n**3

    return Item("matmul peak", run, device=device, unit="flop", window_s=window_s,
                info={"n": n, "dtype": str(dtype).replace("torch.", "")})


# ------------------------------------------------------------------------------------------
# Interleaved timing


def _window(item: Item, k: int) -> dict:
    """Time `k` steps of one item, with the machine's load over the same interval."""
    if item.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = cpu_snapshot()
    t0 = time.perf_counter()
    units = item.run(k)
    seconds = time.perf_counter() - t0
    w = {"steps": k, "units": units, "seconds": seconds, "rate": units / seconds,
         **cpu_use(before, cpu_snapshot())}
    if item.device == "cuda":
        w["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return w


def interleave(items: list[Item], s: Settings, log=print) -> tuple[dict, float]:
    """Warm every item up, then `s.repeats` rounds of one timed window each, order rotating.

    A window during which other processes took more than `s.quiet_pct` % of the machine is
    re-timed (after waiting for quiet) up to `s.attempts` times while `s.retry_budget_s` lasts;
    the last attempt is used if quiet, otherwise the least disturbed one. Every attempt is kept.
    Returns each item's record (warm-up, steps per window, windows) and the budget left.
    """
    raw: dict = {}
    for item in items:
        t0, steps, times = time.perf_counter(), 0, []
        while steps < 2 or time.perf_counter() - t0 < s.warmup_s:
            t1 = time.perf_counter()
            item.run(1)
            times.append(time.perf_counter() - t1)
            steps += 1
        step_s = statistics.median(times[len(times) // 2:])
        k = max(1, round((item.window_s or s.window_s) / step_s))
        raw[item.key] = {"warmup": {"steps": steps, "seconds": time.perf_counter() - t0,
                                    "step_s": step_s}, "steps_per_window": k, "windows": []}
        log(f"  warm-up {item.key:34s} {steps:4d} steps, {step_s * 1e3:8.1f} ms/step")
    groups: dict = {}
    for item in items:  # a group times the same steps: its first item's calibration
        if item.group is not None:
            raw[item.key]["steps_per_window"] = groups.setdefault(
                item.group, raw[item.key]["steps_per_window"])
    budget = s.retry_budget_s
    for r in range(s.repeats):
        order = items[r % len(items):] + items[:r % len(items)]
        for item in order:
            k = raw[item.key]["steps_per_window"]
            tries = []
            while True:
                w = _window(item, k)
                w.update(round=r, attempt=len(tries), used=False,
                         disturbed=others_pct(w) > s.quiet_pct)
                tries.append(w)
                if not w["disturbed"] or len(tries) >= s.attempts or budget <= 0:
                    break
                t_retry = time.perf_counter()
                w["then_waited"] = wait_for_quiet(min(10.0, budget), s.quiet_pct)
                budget -= time.perf_counter() - t_retry + w["seconds"]
            use = tries[-1] if not tries[-1]["disturbed"] else min(tries, key=others_pct)
            use["used"] = True
            raw[item.key]["windows"] += tries
            unit = "img/s" if item.unit == "images" else "GFLOP/s"
            scale = 1 if item.unit == "images" else 1e-9
            log(f"  round {r} {item.key:34s} {use['rate'] * scale:9.1f} {unit}  (others "
                f"{others_pct(use):4.1f} %" + (f", {len(tries)} tries" if len(tries) > 1
                                               else "") + ")")
    return raw, budget


def used_windows(record: dict) -> list[dict]:
    """The windows a figure rests on, one per round."""
    return sorted((w for w in record["windows"] if w["used"]), key=lambda w: w["round"])


def summarise(record: dict) -> dict:
    """Median, min and max rate of the used windows, and their disturbance."""
    ws = used_windows(record)
    rates = [w["rate"] for w in ws]
    out = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
           "windows": len(ws), "steps_per_window": record["steps_per_window"],
           "window_s": statistics.median(w["seconds"] for w in ws),
           "ours_pct": statistics.median(w["ours_pct"] for w in ws),
           "others_pct_max": max(others_pct(w) for w in ws),
           "disturbed_windows": sum(w["disturbed"] for w in ws),
           "retries": sum(1 for w in record["windows"] if w["attempt"] > 0)}
    mem = [w["memory/max_allocated_gib"] for w in ws if "memory/max_allocated_gib" in w]
    if mem:
        out["memory/max_allocated_gib"] = max(mem)
    return out


def ratio(raw: dict, top: str, bottom: str) -> dict:
    """One item's median rate over another's, and the range of per-round ratios."""
    a, b = used_windows(raw[top]), used_windows(raw[bottom])
    paired = [x["rate"] / y["rate"] for x, y in zip(a, b, strict=True)]
    med = statistics.median(w["rate"] for w in a) / statistics.median(w["rate"] for w in b)
    return {"of_medians": med, "per_round_min": min(paired), "per_round_max": max(paired)}


def other_load(raw: dict, keys: list[str], quiet_pct: float) -> dict:
    """How disturbed the used windows were, and how many were re-timed."""
    ws = [w for k in keys for w in raw[k]["windows"]]
    used = [w for w in ws if w["used"]]
    shares = [others_pct(w) for w in used]
    return {"timed_windows": len(used), "attempts": len(ws),
            "retried": sum(w["attempt"] > 0 for w in ws),
            "disturbed_used": sum(w["disturbed"] for w in used),
            "disturbed_first_try": sum(w["disturbed"] for w in ws if w["attempt"] == 0),
            "max_pct": max(shares), "median_pct": statistics.median(shares),
            "quiet": not any(w["disturbed"] for w in used), "threshold_pct": quiet_pct}


# ------------------------------------------------------------------------------------------
# The bench: settings, targets, figures


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
        "settings": {k: v for k, v in asdict(s).items()},
        "machine": machine(s.device), "versions": versions(),
        "matmul_peak": {**peak.info, "gflops": peak_flops / 1e9,
                        "gflops_min": peak_sum["min"] / 1e9, "gflops_max": peak_sum["max"] / 1e9,
                        "timing": peak_sum, "raw": raw[peak.key]},
        "results": results, "ratios": ratios,
        "other_load": other_load(raw, keys, s.quiet_pct),
    }


# ------------------------------------------------------------------------------------------
# Output


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def table_rows(record: dict) -> tuple[list[str], list[list]]:
    """The figures as table rows: one per model, ratio to each reference at the end."""
    refs = [r["label"] for r in record["results"] if r["role"] == "reference"]
    head = ["model", "role", "res", "batch", "img/s", "min", "max", "ms/step", "GMACs",
            "MFU %", "others' CPU % (max)", "BN fused"] + [f"x {ref}" for ref in refs]
    rows = []
    for r in record["results"]:
        row = [r["label"], r["role"], r["res"], r["batch"], _fmt(r["throughput/images_per_s"]),
               _fmt(r["throughput/images_per_s_min"]), _fmt(r["throughput/images_per_s_max"]),
               f"{r['time/step_ms']:.1f}", f"{r['gmacs']:.3f}", f"{r['mfu_pct']:.1f}",
               f"{r['timing']['others_pct_max']:.1f}", describe_fusion(r["fusion"])]
        for ref in refs:
            q = record["ratios"].get(f"{r['label']} / {ref}")
            row.append(f"{q['of_medians']:.2f}" if q else "")
        rows.append(row)
    return head, rows


def settings_line(record: dict) -> str:
    """Device, threads, dtype, layout, compile, fusion, mode and timing in one sentence."""
    s, m, p = record["settings"], record["machine"], record["matmul_peak"]
    dev = m.get("gpu", m["cpu"]) if s["device"] == "cuda" else m["cpu"]
    threads = record["results"][0]["threads"] if record["results"] else s["threads"]
    return (f"{s['device']} ({dev}, {m['usable_cores']} usable cores), {threads} thread(s), "
            f"{'amp ' + s['amp'] if s['amp'] else 'fp32'}, channels_last "
            f"{'on' if s['channels_last'] else 'off'}, compile {'on' if s['compile'] else 'off'}, "
            f"fuse-bn {'on' if s['fuse_bn'] else 'off'}, mode {s['mode']}; warm-up "
            f"{s['warmup_s']:g} s, {s['repeats']} interleaved windows of ~{s['window_s']:g} s "
            f"(median shown); matmul peak {p['gflops']:.1f} GFLOP/s ({p['dtype']}, "
            f"{p['n']}x{p['n']})")


def load_line(load: dict) -> str:
    """Whether other processes disturbed the timed windows."""
    if load["quiet"]:
        return (f"Quiet: other processes (and the hypervisor) took at most "
                f"{load['max_pct']:.1f} % of the machine in any window used "
                f"({load['retried']} window(s) re-timed after a disturbed try).")
    return (f"NOT QUIET: other processes took more than {load['threshold_pct']:g} % of the "
            f"machine in {load['disturbed_used']} of the {load['timed_windows']} windows used "
            f"(max {load['max_pct']:.1f} %) even after {load['retried']} re-timings; the medians "
            "resist a few such windows, but re-run on a quiet machine before trusting close calls.")


def render_terminal(record: dict) -> str:
    from tabulate import tabulate

    head, rows = table_rows(record)
    lines = [tabulate(rows, head, tablefmt="simple", disable_numparse=True),
             settings_line(record), load_line(record["other_load"])]
    lines += [f"note: {n}" for n in record["settings"]["notes"]]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render_markdown(record: dict) -> str:
    """The `--out` report: regeneration command, settings, figures, ratios, load, machine."""
    head, rows = table_rows(record)
    m, v = record["machine"], record["versions"]
    lines = ["# Throughput", "",
             f"*Generated by `repro bench`; do not edit. Regenerate with `{record['command']}` "
             f"(took {record['total_s'] / 60:.1f} min).*", "",
             settings_line(record) + ".", "", load_line(record["other_load"]), ""]
    lines += _md_table(head, rows)
    if record["ratios"]:
        lines += ["", "Ratios of medians; the range is over the interleaved rounds:", ""]
        lines += _md_table(["ratio", "of medians", "per-round min", "per-round max"],
                           [[k, f"{q['of_medians']:.2f}x", f"{q['per_round_min']:.2f}x",
                             f"{q['per_round_max']:.2f}x"] for k, q in record["ratios"].items()])
    lines += ["", "- FLOPs: GMACs are multiply-adds per image (`repro.measure.complexity`, meta "
              "device); MFU = 2 x GMACs (x3 for a training step) x img/s / the matmul peak.",
              "- Memory: " + ("process max RSS after each model's first step (cumulative)"
                              if record["settings"]["device"] == "cpu"
                              else "CUDA max allocated per model") + "."]
    lines += [f"- {n}" for n in record["settings"]["notes"]]
    lines += ["", f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, "
              f"{m.get('memory_gib', '?')} GiB" + (f"; {m['gpu']}" if "gpu" in m else "")
              + f"; {m['os']}. " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repro bench", description="Images/s of models or recipes' models (timm "
        "benchmark.py's method; interleaved windows, median; every setting recorded).")
    p.add_argument("targets", nargs="+", metavar="MODEL|RECIPE",
                   help="timm model names, or recipe YAMLs (their model at their resolution)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch (default {DEFAULT_BATCH['cpu']} on CPU, {DEFAULT_BATCH['cuda']} "
                   "on CUDA, or the protocol's)")
    p.add_argument("--res", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--mode", choices=("infer", "train"), default="infer",
                   help="infer (inference_mode) or train (forward, loss, backward, AdamW step)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype")
    p.add_argument("--channels-last", action="store_true", help="NHWC model and input")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold BatchNorm into the preceding conv/linear (inference)")
    p.add_argument("--protocol", choices=("levit",), default=None,
                   help="levit: the LeViT paper's speed_test.py (CPU 1 thread batch 16; GPU "
                   "AMP batch 2048; BN fused; 10 s warm-up, 60 s timed)")
    p.add_argument("--reference", default="", metavar="M1,M2",
                   help="reference models timed in the same run (ratios to each)")
    p.add_argument("--out", type=Path, default=None, metavar="MD",
                   help="markdown report (its JSON record is written beside it)")
    p.add_argument("--json", type=Path, default=None, metavar="JSON", help="JSON record")
    p.add_argument("--warmup-s", type=float, default=Settings.warmup_s,
                   help="warm-up seconds per model (default %(default)s)")
    p.add_argument("--window-s", type=float, default=Settings.window_s,
                   help="seconds per timed window (default %(default)s)")
    p.add_argument("--repeats", type=int, default=Settings.repeats,
                   help="timed windows per model, interleaved (default %(default)s)")
    p.add_argument("--attempts", type=int, default=Settings.attempts,
                   help="tries per window when other processes disturb it (default %(default)s)")
    p.add_argument("--retry-budget-s", type=float, default=Settings.retry_budget_s,
                   help="most seconds spent waiting for quiet and re-timing (default "
                   "%(default)s)")
    return p


def _explicit(argv: list[str]) -> set[str]:
    """Settings the user gave on the command line (the protocol must not silently undo them)."""
    names = {"--threads": "threads", "--batch": "batch", "--amp": "amp", "--res": "res",
             "--warmup-s": "warmup_s", "--window-s": "window_s", "--repeats": "repeats",
             "--fuse-bn": "fuse_bn"}
    return {names[a.split("=")[0]] for a in argv if a.split("=")[0] in names}


def settings_from_args(args, argv: list[str]) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = Settings(device=device, threads=args.threads, batch=args.batch, res=args.res,
                 mode=args.mode, amp=args.amp, channels_last=args.channels_last,
                 compile=args.compile, fuse_bn=args.fuse_bn, protocol=args.protocol,
                 warmup_s=args.warmup_s, window_s=args.window_s, repeats=args.repeats,
                 attempts=args.attempts, retry_budget_s=args.retry_budget_s)
    return apply_protocol(s, _explicit(argv))


def write_outputs(record: dict, out: Path | None, json_path: Path | None) -> list[Path]:
    """The markdown and/or JSON files, each written atomically."""
    from repro.io import atomic_write_json, atomic_write_text

    written = []
    if out is not None and json_path is None:
        json_path = out.with_suffix(".json")
    if json_path is not None:
        written.append(atomic_write_json(json_path, record))
    if out is not None:
        written.append(atomic_write_text(out, render_markdown(record)))
    return written


def run_cli(argv: list[str]) -> int:
    """`repro bench ...`: parse, time, print the table, write --out/--json; exit status."""
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        s = settings_from_args(args, argv)
        refs = [r for r in args.reference.split(",") if r.strip()]
        record = bench(args.targets, s, refs, log)
    except BenchError as e:
        print(f"repro bench: error: {e}", file=sys.stderr)
        return 1
    record["command"] = shlex.join(["repro", "bench", *argv])
    print(render_terminal(record))
    for path in write_outputs(record, args.out, args.json):
        print(f"wrote {path}")
    bad = [r["label"] for r in record["results"]
           if not math.isfinite(r["throughput/images_per_s"])]
    return 1 if bad else 0
