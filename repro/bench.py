"""`repro bench ...`: parse, time (`repro.measure.throughput`), print the table and write the
markdown report and its JSON record (`repro.report.throughput`). A command, like `repro.doctor`:
it sits above measure and report, which may not import each other."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from repro.measure.throughput import DEFAULT_BATCH, BenchError, Settings, apply_protocol, bench
from repro.report.throughput import render_markdown, render_terminal


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
