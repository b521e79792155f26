"""A training run from a recipe: build, resume if the run id exists, train, evaluate, record.

Everything is checked (recipe, data, model, teacher) before the run directory is created, so a
bad input leaves nothing behind. Rank 0 writes; every rank computes.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from tqdm import tqdm

import repro.models  # noqa: F401  (registers the papers' models)
from repro.data import build_loaders
from repro.errors import UserError
from repro.recipe import Derived, Recipe, RecipeError, derive
from repro.train import checkpoint, distributed, rundir
from repro.train.loop import RunState, StepConfig, TrainingDiverged, evaluate, train_one_epoch
from repro.train.optim import (
    DistillationLoss,
    build_base_loss,
    build_mixup,
    build_optimizer,
    build_scheduler,
)


class RunExists(UserError, RuntimeError):
    """The run id names a run that has finished: relaunching would overwrite it."""


def smoke_overrides(recipe: Recipe) -> list[str]:
    """`--smoke`: the recipe's model and optimisation, a few steps on the built-in data at a
    small resolution, to check a recipe on a laptop before queueing it."""
    res = 64
    return ["data.dataset=digits", f"data.resolution={res}", f"eval.resolution={res}",
            "data.train_images=null", "data.batch_size=8", "train.global_batch=16",
            "eval.batch_size=64", "model.num_classes=10", "train.max_steps=4",
            "train.log_every_steps=1", "data.workers=2", "train.amp=none",
            "train.compile=false", "train.device=cpu"]


def create_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    m = recipe.model
    kwargs = dict(m.kwargs)
    # Both always passed: an explicit 0 must mean 0, not the model's default.
    kwargs.update(num_classes=num_classes, drop_rate=m.drop_rate, drop_path_rate=m.drop_path)
    cfg = timm.models.get_pretrained_cfg(m.name)
    if cfg is not None and cfg.fixed_input_size and cfg.input_size[-1] != recipe.data.resolution:
        kwargs.setdefault("img_size", recipe.data.resolution)
    if not timm.is_model(m.name):
        raise RecipeError(recipe.path, "model.name", f"unknown model {m.name!r}")
    model = timm.create_model(m.name, **kwargs)
    if m.pretrained_file:
        model.load_state_dict(checkpoint.load_weights(m.pretrained_file, "model.pretrained_file"))
    return model


def build_teacher(recipe: Recipe, num_classes: int, smoke: bool) -> tuple[torch.nn.Module | None,
                                                                      str | None]:
    d = recipe.distill
    if d.type == "none":
        return None, None
    teacher = timm.create_model(d.teacher, num_classes=num_classes)
    note = None
    if d.teacher_file and Path(d.teacher_file).is_file():
        teacher.load_state_dict(checkpoint.load_weights(d.teacher_file, "distill.teacher"))
    elif smoke:
        note = f"untrained teacher: {d.teacher_file} not present (smoke run)"
    else:
        raise RecipeError(recipe.path, "distill.teacher_file",
                          f"{d.teacher_file}: teacher weights not found (no downloads: put the "
                          f"{d.teacher} weights file there first)")
    return teacher.eval().requires_grad_(False), note


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same initial weights on every rank (DDP also broadcasts them)


def train(recipe: Recipe, *, smoke: bool = False, run_id: str | None = None,
          hooks: list[Callable[[RunState], None]] | None = None, progress: bool = True) -> Path:
    """Run (or resume) `recipe`; returns the run directory. Hooks see the state after each
    optimizer step (for tests and tooling; they may raise to interrupt the run)."""
    env = distributed.setup(recipe.train.device)
    try:
        return _train(recipe, env, smoke=smoke, run_id=run_id, hooks=hooks or [],
                      progress=progress)
    finally:
        distributed.teardown()


@dataclass
class Setup:
    """Everything a training step needs, built and checked from a recipe."""

    loaders: Any
    derived: Derived
    model: torch.nn.Module  # wrapped (DDP, compile) as it is stepped
    unwrapped: torch.nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    step: StepConfig
    teacher_note: str | None


def build(recipe: Recipe, env, *, smoke: bool) -> Setup:
    """Data, model, EMA, optimizer, schedule, loss and step settings for this rank.

    Used by the trainer and by `repro profile`, so a profile times the trainer's own steps.
    `smoke` tolerates a missing teacher weights file (an untrained teacher, noted)."""
    t = recipe.train
    seed_everything(t.seed, env.rank)
    probe = derive(recipe, env.world_size, train_images=1 << 40)  # batch split only
    loaders = build_loaders(recipe, batch_size=probe.micro_batch, rank=env.rank,
                            world_size=env.world_size, device=str(env.device), seed=t.seed)
    claimed = recipe.data.train_images
    if claimed is not None and claimed != loaders.train_images:
        raise RecipeError(recipe.path, "data.train_images",
                          f"{claimed} but {loaders.train_path} holds {loaders.train_images} "
                          f"images (the schedule's length follows it: set "
                          f"data.train_images={loaders.train_images} if this is the data meant)")
    d = derive(recipe, env.world_size, train_images=loaders.train_images)
    if recipe.model.num_classes != loaders.num_classes:
        raise RecipeError(recipe.path, "model.num_classes",
                          f"{recipe.model.num_classes} but the data have {loaders.num_classes} "
                          "classes")

    model = create_model(recipe, loaders.num_classes).to(env.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher, teacher_note = build_teacher(recipe, loaders.num_classes, smoke)
    if teacher is not None:
        teacher.to(env.device)
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # LeViT: class head + distillation head
    ema = None
    if t.ema is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema)
    optimizer = build_optimizer(model, recipe, d.lr)
    scheduler = build_scheduler(optimizer, recipe, d)
    scaler = torch.amp.GradScaler("cuda") if t.amp == "fp16" and env.device.type == "cuda" \
        else None
    mixup = build_mixup(recipe, loaders.num_classes)
    loss_fn = DistillationLoss(build_base_loss(recipe, mixup), teacher, recipe.distill.type,
                               recipe.distill.alpha, recipe.distill.tau)
    unwrapped = model
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if t.compile:
        model = torch.compile(model)
    step = StepConfig(env=env, accum_steps=d.accum_steps, amp=t.amp,
                      channels_last=t.channels_last, clip_grad=recipe.optim.clip_grad,
                      clip_mode=recipe.optim.clip_mode, mixup=mixup, ema=ema, scaler=scaler,
                      log_every=t.log_every_steps)
    return Setup(loaders, d, model, unwrapped, ema, optimizer, scheduler, loss_fn, step,
                 teacher_note)


def _train(recipe: Recipe, env, *, smoke, run_id, hooks, progress) -> Path:
    t = recipe.train
    s = build(recipe, env, smoke=smoke)
    loaders, d, model, unwrapped, ema = s.loaders, s.derived, s.model, s.unwrapped, s.ema
    optimizer, scheduler, loss_fn, cfg = s.optimizer, s.scheduler, s.loss_fn, s.step
    scaler, teacher_note = cfg.scaler, s.teacher_note

    # The run directory: only now, with everything checked.
    run_id = distributed.broadcast_object(run_id or t.run_id or rundir.new_run_id(t.seed), env)
    path = rundir.run_dir(t.output_dir, recipe.name, run_id)
    state = RunState()
    last = path / "checkpoints" / "last.pt"
    previous = rundir.read_results(path)
    if previous and previous.get("status") == "complete":
        raise RunExists(f"{path}: this run has completed; launch without a run id for a new "
                        "run (it would be overwritten otherwise)")
    if last.exists():
        ck = checkpoint.load(last)
        unwrapped.load_state_dict(ck["model"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state.load_state_dict(ck["state"])
        rng = ck["rng"]
        checkpoint.set_rng_state(rng[env.rank] if env.rank < len(rng) else rng[0])
    hosts = [socket.gethostname()]
    if env.distributed:
        hosts = [None] * env.world_size
        torch.distributed.all_gather_object(hosts, socket.gethostname())
    if env.is_main:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        rundir.write_launch_files(path, recipe, d, smoke=smoke, world_size=env.world_size,
                                  device=env.device, hosts=hosts)
    log = rundir.MetricsLog(path, enabled=env.is_main)

    from repro.measure.complexity import count

    try:
        cx = count(recipe.model.name, recipe.data.resolution, loaders.num_classes)
        complexity = {"params_m": cx.params_m, "gmacs": cx.gmacs,
                      "resolution": recipe.data.resolution}
    except Exception as e:  # a model kwarg the meta count cannot take; report, don't fail
        complexity = {"params_m": sum(p.numel() for p in unwrapped.parameters()) / 1e6,
                      "gmacs": None, "error": f"{type(e).__name__}: {e}"}

    epochs = recipe.schedule.epochs
    max_steps = t.max_steps
    base = {"run_id": run_id, "recipe": recipe.name, "paper_row": recipe.row_id,
            "canonical": recipe.canonical and not smoke, "smoke": smoke,
            "non_canonical_keys": recipe.non_canonical_keys, "epochs_planned": epochs,
            "steps_planned": d.total_steps, "world_size": env.world_size,
            "device": str(env.device), "amp": t.amp, "channels_last": t.channels_last,
            "compile": t.compile, "data_format": loaders.format,
            "not_applied": loaders.not_applied, "deviations": loaders.deviations,
            "global_batch": d.global_batch,
            "lr": d.lr, **complexity}
    if teacher_note:
        base["notes"] = teacher_note
    evals: dict = {}
    started = time.perf_counter()

    def save(status: str) -> None:
        """Checkpoint (all ranks' RNG) and results, rank 0 writing."""
        state_dict = {**state.state_dict(),
                      "wall_time_s": state.wall_time_s + (time.perf_counter() - started)}
        rngs = [checkpoint.rng_state()]
        if env.distributed:
            rngs = [None] * env.world_size
            torch.distributed.all_gather_object(rngs, checkpoint.rng_state())
        if not env.is_main:
            return
        checkpoint.save(last, {
            "model": unwrapped.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": state_dict, "rng": rngs, "world_size": env.world_size,
        })
        write_results(status)

    def write_results(status: str) -> None:
        if env.is_main:
            rundir.write_results(path, {
                **base, "status": status, "epochs_done": state.epoch, "steps_done": state.step,
                "images_seen": state.images_seen, "train_time_s": state.train_time_s,
                "wall_time_s": state.wall_time_s + (time.perf_counter() - started),
                **{f"final/{k}": v for k, v in evals.items()},
                **{f"best/{k}": v for k, v in state.best.items()},
            })

    def on_step(s: RunState, metrics: dict) -> bool:
        for hook in hooks:
            hook(s)
        if metrics:
            log.log(s.step, {"epoch": s.epoch, **metrics})
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                                lr=f"{metrics['train/lr']:.2e}")
        if bar is not None:
            bar.update(1)
        if max_steps is not None and s.step >= max_steps:
            return False
        if s.step % t.checkpoint_every_steps == 0:
            save("running")
        return True

    bar = None
    status = "complete"
    try:
        while state.epoch < epochs:
            if progress and env.is_main:
                bar = tqdm(total=d.steps_per_epoch, initial=state.batch_in_epoch // d.accum_steps,
                           desc=f"epoch {state.epoch + 1}/{epochs}", unit="step", leave=False,
                           disable=None)  # None: off when stderr is not a terminal
            t0 = time.perf_counter()
            done = train_one_epoch(model, loaders.train.epoch(state.epoch, state.batch_in_epoch),
                                   optimizer, scheduler, loss_fn, state, cfg,
                                   steps=d.steps_per_epoch, unwrapped=unwrapped, on_step=on_step)
            state.train_time_s += time.perf_counter() - t0
            if bar is not None:
                bar.close()
            if not done:  # train.max_steps reached mid-epoch
                status = "incomplete"
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            last_epoch = state.epoch == epochs
            if last_epoch or state.epoch % recipe.eval.every_epochs == 0:
                evals = evaluate_all(model, ema, loaders, env, t)
                for k, v in evals.items():
                    if k.endswith(("/top1", "/top5")) and v > state.best.get(k, -1):
                        state.best[k] = v
                        if env.is_main and k == "eval/top1":
                            checkpoint.save(path / "checkpoints" / "best.pt",
                                            {"model": unwrapped.state_dict(), "epoch": state.epoch})
                log.log(state.step, {"epoch": state.epoch, **evals})
                if env.is_main and progress:
                    tqdm.write(f"epoch {state.epoch}/{epochs}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in evals.items() if k.endswith("top1")))
            save("running" if not last_epoch else status)
        if status == "incomplete":
            evals = evaluate_all(model, ema, loaders, env, t)
            log.log(state.step, {"epoch": state.epoch, **evals})
            save(status)
    except TrainingDiverged as e:
        write_results("failed")
        log.close()
        raise TrainingDiverged(f"{path}: {e}; the last good checkpoint is kept: "
                               f"{last if last.exists() else 'none yet'}") from None
    log.close()
    return path


def evaluate_all(model, ema, loaders, env, t) -> dict:
    out = {}
    for prefix, m in (("eval", model), ("eval_ema", ema.module if ema is not None else None)):
        if m is None:
            continue
        r = evaluate(m, loaders.val, env, amp=t.amp, channels_last=t.channels_last)
        out.update({f"{prefix}/{k}": v for k, v in r.items() if k != "count"})
        out[f"{prefix}/count"] = r["count"]
    return out

