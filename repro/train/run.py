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
import torch
from tqdm import tqdm

from repro import models, rundir
from repro.data import build_loaders
from repro.errors import UserError
from repro.recipe import Derived, Recipe, RecipeError, derive, load_recipe, scientific_changes
from repro.train import checkpoint, distributed, record, stages
from repro.train.loop import RunState, StepConfig, TrainingDiverged, evaluate, train_one_epoch
from repro.train.optim import (
    DistillationLoss,
    build_base_loss,
    build_mixup,
    build_optimizer,
    build_scheduler,
)


def create_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    m = recipe.model
    kwargs = dict(m.kwargs)
    # Both always passed: an explicit 0 must mean 0, not the model's default.
    kwargs.update(num_classes=num_classes, drop_rate=m.drop_rate, drop_path_rate=m.drop_path)
    try:
        model = models.create(m.name, recipe.data.resolution, **kwargs)
    except models.UnknownModel as e:
        raise RecipeError(recipe.path, "model.name", str(e)) from None
    if m.pretrained_file:
        checkpoint.load_file_into(model, m.pretrained_file, "model.pretrained_file")
    return model


def build_teacher(recipe: Recipe, num_classes: int, smoke: bool) -> tuple[torch.nn.Module | None,
                                                                      str | None]:
    d = recipe.distill
    if d.type == "none":
        return None, None
    teacher = models.create(d.teacher, recipe.data.resolution, num_classes=num_classes)
    note = None
    if d.teacher_file and Path(d.teacher_file).is_file():
        checkpoint.load_file_into(teacher, d.teacher_file, "distill.teacher_file")
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
        return Training(recipe, env, smoke=smoke, run_id=run_id, hooks=hooks or [],
                        progress=progress).run()
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
    start: stages.Loaded | None = None  # the parent stage this run starts from


def build(recipe: Recipe, env, *, smoke: bool, load_parent: bool = True) -> Setup:
    """Data, model, EMA, optimizer, schedule, loss and step settings for this rank.

    Used by the trainer and by `repro profile`, so a profile times the trainer's own steps.
    `smoke` tolerates a missing teacher weights file (an untrained teacher, noted); `load_parent`
    loads a fine-tune's parent weights (a profile times the steps, which do not need them)."""
    t = recipe.train
    named = (("model.name", recipe.model.name), ("distill.teacher", recipe.distill.teacher))
    for key, name in named:
        try:  # before any data is built or opened
            if name is not None:
                models.check_name(name)
        except models.UnknownModel as e:
            raise RecipeError(recipe.path, key, str(e)) from None
    seed_everything(t.seed, env.rank)
    if env.device.type == "cuda":
        # cuDNN picks its fastest kernels for each shape, as all four official codes do:
        # LeViT main.py@3772b8e line 202, CvT lib/config/default.py@f851e68 and pycls
        # core/config.py (CUDNN.BENCHMARK: True), timm train.py.
        torch.backends.cudnn.benchmark = True
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

    model = create_model(recipe, loaders.num_classes)
    start = stages.start_from_parent(model, recipe, smoke) if load_parent else None
    model = model.to(env.device)
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
        model = torch.compile(model, backend=t.compile_backend)
    step = StepConfig(env=env, accum_steps=d.accum_steps, amp=t.amp,
                      channels_last=t.channels_last, clip_grad=recipe.optim.clip_grad,
                      clip_mode=recipe.optim.clip_mode, mixup=mixup, ema=ema, scaler=scaler,
                      log_every=t.log_every_steps)
    return Setup(loaders, d, model, unwrapped, ema, optimizer, scheduler, loss_fn, step,
                 teacher_note, start)


# Scientific keys a resume may change: train.max_steps only says where this launch stops (the
# schedule follows schedule.epochs), so a truncated run can be resumed further.
RESUMABLE = ("train.max_steps",)


class Training:
    """One launch of a run, top to bottom: `Training(recipe, env, ...).run()`.

    The constructor builds and checks everything, then opens the run directory (resuming its
    last checkpoint); `run()` trains epoch by epoch, evaluating, checkpointing and writing
    results.json as it goes; rank 0 writes, every rank computes.
    """

    def __init__(self, recipe: Recipe, env, *, smoke: bool, run_id: str | None,
                 hooks: list[Callable[[RunState], None]], progress: bool):
        self.recipe, self.env, self.smoke, self.hooks = recipe, env, smoke, hooks
        self.progress = progress and env.is_main
        self.s = build(recipe, env, smoke=smoke)
        if self.s.start is not None and not self.s.start.parent.good:
            recipe.non_canonical_keys.append("init (the parent run is not complete and "
                                             "canonical)")
        # The run directory: only now, with everything checked.
        t = recipe.train
        run_id = distributed.broadcast_object(
            rundir.choose_run_id(run_id, t.run_id, t.seed), env)
        self.run_dir = rundir.Run.at(t.output_dir, recipe.name, run_id)
        self.lock = None
        self.log = None
        self.state = RunState()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self.base = self._describe(run_id)
        self.evals: dict = {}
        self.bar = None
        self.started = time.perf_counter()

    def _open(self) -> None:
        """Hold the run directory (one live launch per run), check that a resume trains the
        run's own recipe, resume from its checkpoint, and record this launch."""
        env, run = self.env, self.run_dir
        problem = None
        if env.is_main:
            try:
                run.refuse_if_complete()
                self.lock = run.hold()
                run.remove_stale_temporaries()
                self._check_resume()
            except UserError as e:
                problem = e
        message = distributed.broadcast_object(str(problem) if problem else None, env)
        if problem is not None:
            raise problem
        if message is not None:
            raise rundir.RunError(message)
        checkpoint.resume(run.last_checkpoint, self.s, self.state, env.rank)
        hosts = self._hosts()  # a collective: every rank takes part
        if env.is_main:
            run.trim_metrics(self.state.step)  # steps after the checkpoint are trained again
            record.write_launch_files(run, self.recipe, self.s.derived, smoke=self.smoke,
                                      world_size=env.world_size, device=env.device, hosts=hosts,
                                      init=self.s.start.record() if self.s.start else None)
        self.log = record.MetricsLog(run.path, enabled=env.is_main)

    def _check_resume(self) -> None:
        """A relaunch resumes the run's own recipe: a changed scientific key is refused (the
        schedule, the data and the record would no longer match), and a run with metrics but
        no checkpoint is not silently restarted (its steps would be logged twice)."""
        run = self.run_dir
        if run.metrics() and not run.last_checkpoint.exists():
            raise rundir.RunError(f"{run.path}: has metrics but no checkpoint to resume from "
                                  "(restarting would log its steps twice): relaunch with a new "
                                  "run id")
        if not run.file("recipe.yaml").exists():
            return
        before = load_recipe(run.file("recipe.yaml"))
        changed = [k for k in scientific_changes(before, self.recipe) if k not in RESUMABLE]
        if bool(run.json("launch.json").get("smoke")) != self.smoke:
            changed.append("--smoke")
        if changed:
            shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
            raise rundir.RunError(
                f"{run.path}: a resume trains the run's own recipe, but these scientific keys "
                f"differ from its recipe.yaml: {shown}; relaunch it unchanged, or use a new run "
                "id")

    def close(self) -> None:
        """Close the metrics log and let the run directory go (also on errors)."""
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _hosts(self) -> list[str]:
        hosts = [socket.gethostname()]
        if self.env.distributed:
            hosts = [None] * self.env.world_size
            torch.distributed.all_gather_object(hosts, socket.gethostname())
        return hosts

    def _describe(self, run_id: str) -> dict:
        """The results record's fixed part: what this run is."""
        recipe, t, d, loaders = self.recipe, self.recipe.train, self.s.derived, self.s.loaders
        base = {"run_id": run_id, "recipe": recipe.name, "seed": t.seed,
                "paper_row": recipe.row_id, "canonical": recipe.canonical and not self.smoke,
                "smoke": self.smoke, "non_canonical_keys": recipe.non_canonical_keys,
                "epochs_planned": recipe.schedule.epochs, "steps_planned": d.total_steps,
                "world_size": self.env.world_size, "device": str(self.env.device),
                "amp": t.amp, "channels_last": t.channels_last, "compile": t.compile,
                **({"compile_backend": t.compile_backend} if t.compile else {}),
                "data_format": loaders.format, "not_applied": loaders.not_applied,
                "deviations": loaders.deviations, "global_batch": d.global_batch, "lr": d.lr,
                **complexity(recipe, loaders.num_classes, self.s.unwrapped)}
        if self.s.teacher_note:
            base["notes"] = self.s.teacher_note
        if self.s.start is not None:
            base["init"] = self.s.start.record()
        return base

    # -- the run --------------------------------------------------------------------------
    def run(self) -> Path:
        recipe, state, epochs = self.recipe, self.state, self.recipe.schedule.epochs
        status = "complete"
        try:
            while state.epoch < epochs:
                if not self._train_epoch():  # train.max_steps reached mid-epoch
                    status = "incomplete"
                    break
                state.epoch += 1
                state.batch_in_epoch = 0
                last_epoch = state.epoch == epochs
                if last_epoch or state.epoch % recipe.eval.every_epochs == 0:
                    self._evaluate()
                self.save("running" if not last_epoch else status)
            if status == "incomplete":
                self._evaluate(best=False)
                self.save(status)
        except TrainingDiverged as e:
            self.write_results("failed")
            last = self.run_dir.last_checkpoint
            raise TrainingDiverged(f"{self.run_dir.path}: {e}; the last good checkpoint is "
                                   f"kept: {last if last.exists() else 'none yet'}") from None
        finally:
            self.close()
        return self.run_dir.path

    def _train_epoch(self) -> bool:
        s, state, d, epochs = self.s, self.state, self.s.derived, self.recipe.schedule.epochs
        if self.progress:
            self.bar = tqdm(total=d.steps_per_epoch,
                            initial=state.batch_in_epoch // d.accum_steps,
                            desc=f"epoch {state.epoch + 1}/{epochs}", unit="step", leave=False,
                            disable=None)  # None: off when stderr is not a terminal
        t0 = time.perf_counter()
        done = train_one_epoch(s.model, s.loaders.train.epoch(state.epoch, state.batch_in_epoch),
                               s.optimizer, s.scheduler, s.loss_fn, state, s.step,
                               steps=d.steps_per_epoch, unwrapped=s.unwrapped,
                               on_step=self._on_step)
        state.train_time_s += time.perf_counter() - t0
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return done

    def _on_step(self, state: RunState, metrics: dict) -> bool:
        """After each optimizer step: hooks, logging, progress, checkpoints; False stops."""
        for hook in self.hooks:
            hook(state)
        if metrics:
            self.log.log(state.step, {"epoch": state.epoch, **metrics})
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                                     lr=f"{metrics['train/lr']:.2e}")
        if self.bar is not None:
            self.bar.update(1)
        max_steps = self.recipe.train.max_steps
        if max_steps is not None and state.step >= max_steps:
            return False
        if state.step % self.recipe.train.checkpoint_every_steps == 0:
            self.save("running")
        return True

    def _evaluate(self, best: bool = True) -> None:
        """Evaluate (raw and EMA), log, keep the best; best.pt holds the best raw top-1."""
        s, state, env = self.s, self.state, self.env
        self.evals = evaluate_all(s.model, s.ema, s.loaders, env, self.recipe.train)
        for k, v in self.evals.items():
            if best and k.endswith(("/top1", "/top5")) and v > state.best.get(k, -1):
                state.best[k] = v
                if env.is_main and k == "eval/top1":
                    checkpoint.save(self.run_dir.best_checkpoint,
                                    {"model": s.unwrapped.state_dict(), "epoch": state.epoch})
        self.log.log(state.step, {"epoch": state.epoch, **self.evals})
        if best and self.progress:
            tqdm.write(f"epoch {state.epoch}/{self.recipe.schedule.epochs}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in self.evals.items() if k.endswith("top1")))

    # -- records --------------------------------------------------------------------------
    def _wall_time_s(self) -> float:
        return self.state.wall_time_s + (time.perf_counter() - self.started)

    def save(self, status: str) -> None:
        """Checkpoint (every rank's RNG) and results, rank 0 writing. Weights that are no
        longer finite are never written: the previous checkpoint stays the last good one."""
        env, s = self.env, self.s
        bad = checkpoint.non_finite(s.unwrapped.state_dict())
        if s.ema is not None:
            bad += [f"EMA {k}" for k in checkpoint.non_finite(s.ema.state_dict())]
        if bad:
            raise TrainingDiverged(f"{len(bad)} weight tensors are not finite after step "
                                   f"{self.state.step} (e.g. {bad[0]})")
        state_dict = {**self.state.state_dict(), "wall_time_s": self._wall_time_s()}
        rngs = [checkpoint.rng_state()]
        if env.distributed:
            rngs = [None] * env.world_size
            torch.distributed.all_gather_object(rngs, checkpoint.rng_state())
        if not env.is_main:
            return
        checkpoint.save(self.run_dir.last_checkpoint,
                        checkpoint.snapshot(self.s, state_dict, rngs, env.world_size))
        self.write_results(status)

    def write_results(self, status: str) -> None:
        if not self.env.is_main:
            return
        state = self.state
        self.run_dir.write_results(rundir.Results.from_json({
            **self.base, "status": status, "epochs_done": state.epoch,
            "steps_done": state.step, "images_seen": state.images_seen,
            "train_time_s": state.train_time_s, "wall_time_s": self._wall_time_s(),
            **{f"final/{k}": v for k, v in self.evals.items()},
            **{f"best/{k}": v for k, v in state.best.items()},
        }))


def complexity(recipe: Recipe, num_classes: int, model: torch.nn.Module) -> dict:
    """Params and GMACs of the recipe's model at its resolution (counted on the meta device)."""
    from repro.measure.complexity import count

    try:
        cx = count(recipe.model.name, recipe.data.resolution, num_classes)
        return {"params_m": cx.params_m, "gmacs": cx.gmacs, "resolution": recipe.data.resolution}
    except Exception as e:  # a model kwarg the meta count cannot take; report, don't fail
        return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gmacs": None,
                "error": f"{type(e).__name__}: {e}"}


def evaluate_all(model, ema, loaders, env, t, predictions: dict | None = None) -> dict:
    """Raw and EMA evaluation; `predictions`, when given, receives each one's top-5 classes
    (this rank's, in its shard's order) under its prefix."""
    out = {}
    for prefix, m in (("eval", model), ("eval_ema", ema.module if ema is not None else None)):
        if m is None:
            continue
        kept = predictions.setdefault(prefix, []) if predictions is not None else None
        r = evaluate(m, loaders.val, env, amp=t.amp, channels_last=t.channels_last,
                     predictions=kept)
        out.update({f"{prefix}/{k}": v for k, v in r.items() if k != "count"})
        out[f"{prefix}/count"] = r["count"]
    return out

