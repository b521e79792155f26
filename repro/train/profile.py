"""`repro profile`: torch.profiler traces of a recipe's real training steps.

The model, optimizer, schedule, loss and data are built as `repro.train.run` builds them, and the
steps are the trainer's own (`train_one_epoch`: accumulation, clipping, EMA, data loading), run
under `torch.profiler.profile` with the recipe's `profile` schedule. Each recorded cycle is
written twice over (STYLE.md item 13, kineto#857: the TensorBoard plugin is deprecated upstream):
as `tb/profile/<worker>.<ts>.pt.trace.json` by `tensorboard_trace_handler`, which the
torch-tb-profiler plugin reads, and as `trace.json`, the same Chrome trace, for Perfetto or
chrome://tracing. A table of the top operators (self CPU time; CUDA time too on GPUs) is printed
and saved as `top_ops.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

from repro.data import DataError
from repro.io import atomic_write_json, atomic_write_text
from repro.measure import positive_int
from repro.recipe import Recipe, load_recipe
from repro.recipe import add_arguments as add_recipe_arguments
from repro.report import profile as profile_report
from repro.train import distributed
from repro.train.loop import RunState, train_one_epoch
from repro.train.run import build

TOP_ROWS = 25


@dataclass
class ProfileResult:
    """Where one `repro profile` put its files, and what it recorded."""

    out_dir: Path
    tb_dir: Path
    tb_traces: list[Path] = field(default_factory=list)
    chrome_traces: list[Path] = field(default_factory=list)
    top_ops: Path | None = None
    record: Path | None = None
    table: str = ""  # the last cycle's top-operators table (markdown)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repro profile",
        description="Profile a recipe's training steps with torch.profiler: a TensorBoard "
        "(torch-tb-profiler) trace, a Chrome/Perfetto trace.json and a top-operators table.")
    add_recipe_arguments(p, "recipes/levit_256.yaml",
                         "dotted overrides, values read as YAML (e.g. profile.warmup=2)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="active (recorded) steps per cycle; default the recipe's profile.active")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: <train.output_dir>/<recipe>/"
                   "profile-<timestamp>)")
    return p


def run_cli(argv: list[str]) -> int:
    """`repro profile`: profile, print the table and the files written; the exit status."""
    args = build_parser().parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides, smoke=args.smoke)
    result = profile(recipe, active=args.steps, out=args.out, smoke=args.smoke)
    if result is None:  # a rank other than 0 under torchrun
        return 0
    print(result.table)
    print(f"profile of {recipe.name}: {result.out_dir}")
    for path in result.tb_traces:
        print(f"  TensorBoard trace: {path}")
    print(f"    view: tensorboard --logdir {result.tb_dir.parent}  (PyTorch Profiler tab)")
    for path in result.chrome_traces:
        print(f"  Chrome/Perfetto trace: {path}  (https://ui.perfetto.dev or chrome://tracing)")
    print(f"  top operators: {result.top_ops}")
    print(f"  settings: {result.record}")
    return 0


def profile(recipe: Recipe, *, active: int | None = None, out: str | os.PathLike | None = None,
            smoke: bool = False) -> ProfileResult | None:
    """Profile the recipe's training steps; returns the files written (None on ranks > 0)."""
    env = distributed.setup(recipe.train.device)
    try:
        return _profile(recipe, env, active=active, out=out, smoke=smoke)
    finally:
        distributed.teardown()


def _profile(recipe: Recipe, env, *, active, out, smoke) -> ProfileResult | None:
    t, pc = recipe.train, recipe.profile
    active = active or pc.active
    # Timing does not depend on the teacher's weights: an absent file is a note, not an error.
    # The trainer's own objects and step settings; a fine-tune's parent weights are not needed
    setup = build(recipe, env, smoke=True, load_parent=False)
    loaders, d, model, unwrapped = setup.loaders, setup.derived, setup.model, setup.unwrapped
    optimizer, scheduler, loss_fn, cfg = setup.optimizer, setup.scheduler, setup.loss_fn, \
        setup.step
    teacher_note = setup.teacher_note

    # Only now, with everything built and checked, the output directory.
    stamp = distributed.broadcast_object(dt.datetime.now().strftime("%Y%m%d-%H%M%S"), env)
    out_dir = Path(out) if out else Path(t.output_dir) / recipe.name / f"profile-{stamp}"
    tb_dir = out_dir / "tb" / "profile"
    tb_dir.mkdir(parents=True, exist_ok=True)
    result = ProfileResult(out_dir=out_dir, tb_dir=tb_dir)
    cuda = env.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    worker = f"{socket.gethostname()}_{os.getpid()}"  # the handler's default, made known
    tb_handler = tensorboard_trace_handler(str(tb_dir), worker_name=worker)
    cycles: list[dict] = []  # each cycle's top operators
    suffix = f"-rank{env.rank}" if env.distributed else ""

    def on_trace_ready(prof) -> None:
        before = set(tb_dir.glob(f"{worker}.*.pt.trace.json"))
        tb_handler(prof)
        (written,) = set(tb_dir.glob(f"{worker}.*.pt.trace.json")) - before
        result.tb_traces.append(written)
        # A kineto trace can be saved once only: the Chrome copy is the same file, linked.
        cycle = len(result.tb_traces)
        name = f"trace{suffix}.json" if pc.repeat == 1 else f"trace{suffix}-{cycle}.json"
        _link_or_copy(written, out_dir / name)
        result.chrome_traces.append(out_dir / name)
        cycles.append(top_ops(prof.key_averages(), cuda=cuda, memory=pc.profile_memory))

    total = (pc.wait + pc.warmup + active) * pc.repeat
    state = RunState()
    done = 0

    with warnings.catch_warnings():
        # Each cycle's events are read in on_trace_ready, before the profiler clears them.
        warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each")
        with torch.profiler.profile(
                activities=activities,
                schedule=schedule(wait=pc.wait, warmup=pc.warmup, active=active,
                                  repeat=pc.repeat),
                on_trace_ready=on_trace_ready, record_shapes=pc.record_shapes,
                profile_memory=pc.profile_memory, with_stack=pc.with_stack) as prof:

            def on_step(s: RunState, metrics: dict) -> bool:
                nonlocal done
                prof.step()
                done += 1
                return done < total

            started = time.perf_counter()
            while done < total:  # as many epochs as the schedule needs
                before = done
                train_one_epoch(model, loaders.train.epoch(state.epoch), optimizer, scheduler,
                                loss_fn, state, cfg, steps=d.steps_per_epoch,
                                unwrapped=unwrapped, on_step=on_step)
                if done == before:
                    raise DataError(f"{loaders.train_path}: an epoch gave no training step "
                                    f"(batch {d.micro_batch} x {d.accum_steps} per step)")
                if done < total:
                    state.epoch += 1
                    state.batch_in_epoch = 0
            wall = time.perf_counter() - started

    if not env.is_main:
        return None
    rel = [str(p.relative_to(out_dir)) for p in (*result.tb_traces, *result.chrome_traces)]
    atomic_write_text(out_dir / "recipe.yaml", f"# resolved from {recipe.path}" + (
        f" with overrides: {' '.join(recipe.overrides)}" if recipe.overrides else "") + "\n"
        + recipe.to_yaml())
    record = {
        "recipe": recipe.path, "name": recipe.name, "model": recipe.model.name,
        "overrides": recipe.overrides, "smoke": smoke, "device": str(env.device),
        "world_size": env.world_size, "torch": torch.__version__,
        "schedule": {"wait": pc.wait, "warmup": pc.warmup, "active": active,
                     "repeat": pc.repeat},
        "record_shapes": pc.record_shapes, "profile_memory": pc.profile_memory,
        "with_stack": pc.with_stack, "micro_batch": d.micro_batch,
        "accum_steps": d.accum_steps, "amp": t.amp, "channels_last": t.channels_last,
        "compile": t.compile, "data_format": loaders.format, "steps_run": done,
        "wall_time_s": wall, "files": rel + ["top_ops.md", "recipe.yaml"],
        "resolution": recipe.data.resolution, "teacher_file": recipe.distill.teacher_file,
        "teacher_note": teacher_note, "top_ops": cycles,
    }
    result.record = atomic_write_json(out_dir / "profile.json", record)
    result.top_ops = atomic_write_text(out_dir / "top_ops.md", profile_report.render(record))
    result.table = profile_report.table(cycles[-1]) if cycles else ""
    return result


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def top_ops(averages, *, cuda: bool, memory: bool, rows: int = TOP_ROWS) -> dict:
    """The top operators of `key_averages()` by self CPU time (and by CUDA time on GPUs), as
    table rows for repro.report.profile."""
    events = list(averages)
    cpu_total = sum(e.self_cpu_time_total for e in events) or 1.0
    dev_total = sum(e.self_device_time_total for e in events) or 1.0

    def row(e) -> list:
        r = [f"`{e.key}`", e.count, e.self_cpu_time_total / 1e3,
             100 * e.self_cpu_time_total / cpu_total, e.cpu_time_total / 1e3]
        if cuda:
            r += [e.self_device_time_total / 1e3, 100 * e.self_device_time_total / dev_total,
                  e.device_time_total / 1e3]
        if memory:
            r.append(e.self_cpu_memory_usage / 2**20)
        return r

    head = ["operator", "calls", "self CPU (ms)", "self CPU %", "CPU total (ms)"]
    if cuda:
        head += ["self CUDA (ms)", "self CUDA %", "CUDA total (ms)"]
    if memory:
        head.append("self CPU mem (MiB)")
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    by_dev = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    return {"head": head, "by_cpu": [row(e) for e in by_cpu],
            "by_cuda": [row(e) for e in by_dev] if cuda else None}
