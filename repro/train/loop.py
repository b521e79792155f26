"""One epoch of training and one evaluation, as plain functions."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad

from repro.errors import UserError
from repro.train.distributed import DistEnv, all_reduce_sum


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class RunState:
    """Where a run is: enough, with the checkpointed objects, to resume it exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best: dict = field(default_factory=dict)  # best eval metrics so far, e.g. {"eval/top1": 81}
    train_time_s: float = 0.0  # inside train_one_epoch, all launches
    wall_time_s: float = 0.0  # launch to checkpoint, all earlier launches of this run
    images_seen: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)


@dataclass
class StepConfig:
    """What one training step needs besides the model, optimizer and data."""

    env: DistEnv
    accum_steps: int
    amp: str = "none"
    channels_last: bool = False
    clip_grad: float | None = None
    clip_mode: str = "norm"
    mixup: Any = None
    ema: Any = None
    scaler: Any = None
    log_every: int = 50


def autocast(device: torch.device, amp: str):
    """bf16 autocast on CPU and GPU, fp16 on GPU; nothing for `none`."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(x, y, cfg: StepConfig):
    device = cfg.env.device
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_one_epoch(model, batches, optimizer, scheduler, loss_fn, state: RunState,
                    cfg: StepConfig, *, steps: int, unwrapped=None,
                    on_step: Callable[[RunState, dict], bool] | None = None) -> bool:
    """Train until the epoch's `steps` optimizer steps are done (counting from where `state`
    says the epoch is). `on_step(state, metrics)` runs after every optimizer step and may
    return False to stop early. Returns False if stopped early, True at the epoch's end."""
    model.train()
    unwrapped = unwrapped or model
    accum = cfg.accum_steps
    micro = state.batch_in_epoch
    step_loss = torch.zeros((), device=cfg.env.device)
    window = {"images": 0, "data_s": 0.0, "start": time.perf_counter(), "loss": 0.0, "n": 0}
    t_fetch = time.perf_counter()
    for x, y in batches:
        if micro >= steps * accum:
            break
        window["data_s"] += time.perf_counter() - t_fetch
        x, y = _to_device(x, y, cfg)
        n_images = x.shape[0]
        if cfg.mixup is not None:
            x, y = cfg.mixup(x, y)
        final = (micro + 1) % accum == 0
        sync = model.no_sync() if cfg.env.distributed and not final else contextlib.nullcontext()
        with sync:
            with autocast(cfg.env.device, cfg.amp):
                out = model(x)
                loss = loss_fn(x, out, y)
            scaled = loss / accum
            (cfg.scaler.scale(scaled) if cfg.scaler else scaled).backward()
        step_loss += loss.detach().float() / accum
        micro += 1
        window["images"] += n_images * cfg.env.world_size
        if final:
            _optimizer_step(model, optimizer, step_loss, state, cfg)
            state.step += 1
            state.batch_in_epoch = micro
            state.images_seen += n_images * accum * cfg.env.world_size
            scheduler.step_update(num_updates=state.step)
            if cfg.ema is not None:
                cfg.ema.update(unwrapped, step=state.step)
            window["loss"] += step_loss.item()
            window["n"] += 1
            step_loss.zero_()
            metrics = {}
            if state.step % cfg.log_every == 0 or micro >= steps * accum:
                metrics = _window_metrics(window, optimizer)
            if on_step is not None and on_step(state, metrics) is False:
                return False
        t_fetch = time.perf_counter()
    return True


def _optimizer_step(model, optimizer, step_loss, state: RunState, cfg: StepConfig) -> None:
    finite = torch.isfinite(step_loss).float()
    if cfg.env.distributed:  # every rank stops together if any diverged
        finite = finite.to("cpu" if cfg.env.backend == "gloo" else finite.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 0:
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss is {step_loss.item()} at step {state.step + 1} "
                               f"(epoch {state.epoch + 1})")
    if cfg.clip_grad is not None:
        if cfg.scaler is not None:
            cfg.scaler.unscale_(optimizer)
        dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
    if cfg.scaler is not None:
        cfg.scaler.step(optimizer)
        cfg.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _window_metrics(window: dict, optimizer) -> dict:
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    metrics = {
        "train/loss": window["loss"] / max(window["n"], 1),
        "train/lr": optimizer.param_groups[0]["lr"],
        "throughput/images_per_s": window["images"] / elapsed,
        "time/data_pct": 100 * window["data_s"] / elapsed,
    }
    if torch.cuda.is_available():
        metrics["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    window.update(images=0, data_s=0.0, start=time.perf_counter(), loss=0.0, n=0)
    return metrics


@torch.no_grad()
def evaluate(model, batches, env: DistEnv, *, amp: str = "none",
             channels_last: bool = False, predictions: list | None = None) -> dict:
    """Top-1/top-5 and loss over this rank's shard, summed over ranks (exact counts).
    `predictions`, when given, receives this rank's top-5 class indices, batch by batch in
    the shard's order (for label sets that are not one class an image: ImageNet-ReaL)."""
    model.eval()
    cfg = StepConfig(env=env, accum_steps=1, channels_last=channels_last)
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for x, y in batches:
        x, y = _to_device(x, y, cfg)
        with autocast(env.device, amp):
            out = model(x)
        if isinstance(out, tuple):  # a distilled model in train mode; eval averages heads
            out = (out[0] + out[1]) / 2
        out = out.float()
        loss_sum += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
        top5 = out.topk(min(5, out.shape[1]), dim=1).indices
        if predictions is not None:
            predictions.append(top5.cpu())
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(dim=1).sum().item()
        count += y.numel()
    c1, c5, ls, n = all_reduce_sum([correct1, correct5, loss_sum, count], env)
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "count": 0}
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": ls / n, "count": int(n)}
