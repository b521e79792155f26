"""What `repro bench` times: a model's inference or training step (built, BatchNorm folded,
moved, compiled, batch halved on out-of-memory) and the matmul peak that MFU is taken against."""

from __future__ import annotations

import contextlib
import gc
import resource
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from repro.measure.complexity import count_model
from repro.measure.fuse import fuse_bn
from repro.measure.timing import Item
from repro.models import create

if TYPE_CHECKING:
    from repro.measure.throughput import Settings, Target

PEAK_N = {"cpu": 2048, "cuda": 8192}  # side of the square matmul timed for MFU


def _autocast(device: str, amp: str | None):
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
        meta = create(model, res, **kwargs)
    c = count_model(meta, res, model)
    return c.gmacs, c.params


def model_item(t: Target, s: Settings, log=print) -> Item:
    """A model ready to time (built, folded, moved, compiled, one step done); OOM halves batch."""
    dev = s.device
    gmacs, params = count_gmacs(t.model, t.res, t.kwargs)
    model = create(t.model, t.res, **t.kwargs)
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

