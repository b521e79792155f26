"""LeViT's CPU speeds (paper Table 3) re-timed here, and the trainer's step vs a plain timm step.

Writes `reports/throughput_cpu.md` and the raw numbers beside it (`reports/throughput_cpu.json`):

1. LeViT-128S/128/192/256/384 and the distilled DeiT-Tiny/Small (the paper's CPU comparison
   rows) under the LeViT paper's CPU protocol (speed_test.py: 1 thread, batch 16, fp32,
   BatchNorm fused), via `repro.measure.throughput.bench`: absolute images/s beside the paper's
   Intel Xeon 6138 figures, and — the claim that can travel between machines — each model's
   speed relative to LeViT-256, here and in the paper. Windows are interleaved across models.
2. One training step of repro's trainer (`repro.train.loop.train_one_epoch`, accum 1, no
   mixup/EMA) against a plain loop (forward, cross-entropy, backward, AdamW step, zero_grad) on
   the same model, batch and synthetic tensors, interleaved: images/s and their ratio.

Every timed window records other processes' CPU use (/proc); disturbed windows are re-timed once
the machine is quiet, within a time budget, and the report says if it never was.

Usage (from the repository root):
    python benchmarks/throughput_cpu.py [--warmup-s 3] [--window-s 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from repro.measure import throughput as tp
from repro.measure.cpuload import wait_for_quiet
from repro.measure.steps import count_gmacs, figure_settings, matmul_item
from repro.measure.timing import Item, interleave, ratio
from repro.models import create
from repro.report.throughput import ANCHOR, GRAVITON, XEON, describe_fusion, render

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "reports" / "throughput_cpu.md"
LEVIT_ROWS = ["LeViT-128S", "LeViT-128", "LeViT-192", "LeViT-256", "LeViT-384"]
REFERENCE_ROWS = ["DeiT-Tiny", "DeiT-Small"]


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; the defaults are the ones the committed report uses."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup-s", type=float, default=3.0, help="warm-up seconds per model")
    p.add_argument("--window-s", type=float, default=3.0, help="seconds per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per model")
    p.add_argument("--attempts", type=int, default=3, help="tries per disturbed window")
    p.add_argument("--retry-budget-s", type=float, default=45.0,
                   help="most seconds per part spent waiting for quiet and re-timing")
    p.add_argument("--initial-wait-s", type=float, default=20.0,
                   help="wait up to this long for a quiet machine before starting")
    p.add_argument("--train-model", default="vit_c_nano", help="model of the trainer comparison")
    p.add_argument("--train-res", type=int, default=64, help="its input size")
    p.add_argument("--train-batch", type=int, default=32, help="its batch")
    p.add_argument("--train-threads", type=int, default=1,
                   help="torch threads of the trainer comparison (see the report's method)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Part 1: the LeViT CPU protocol


def paper_rows() -> dict:
    """The paper's rows (levit.yaml): timm model, GMACs, CPU images/s per machine, source."""
    from repro import papers

    rows = {}
    for name in LEVIT_ROWS + REFERENCE_ROWS:
        r = papers.get_row(f"levit/{name}")
        cpu = {t["device"]: t for t in r["throughput"] if t["device_type"] == "cpu"}
        rows[name] = {"timm_model": r["timm_model"], "gmacs": r["gmacs"],
                      "xeon": cpu[XEON]["images_per_s"], "graviton": cpu[GRAVITON]["images_per_s"],
                      "source": cpu[XEON]["source"], "batch": cpu[XEON]["batch"],
                      "threads": cpu[XEON]["threads"]}
    return rows


def time_levit(args, paper: dict) -> dict:
    """The LeViT CPU protocol over the paper's rows, DeiTs as references."""
    s = tp.apply_protocol(tp.Settings(
        device="cpu", protocol="levit", warmup_s=args.warmup_s, window_s=args.window_s,
        repeats=args.repeats, attempts=args.attempts, retry_budget_s=args.retry_budget_s),
        explicit={"warmup_s", "window_s", "repeats"})
    record = tp.bench([paper[r]["timm_model"] for r in LEVIT_ROWS], s,
                      [paper[r]["timm_model"] for r in REFERENCE_ROWS])
    by_model = {r["model"]: r for r in record["results"]}
    raw = {r["label"]: r["raw"] for r in record["results"]}
    anchor = paper[ANCHOR]["timm_model"]
    rows = []
    for name in LEVIT_ROWS + REFERENCE_ROWS:
        pr, r = paper[name], by_model[paper[name]["timm_model"]]
        here = r["throughput/images_per_s"]
        q = ratio(raw, r["label"], anchor)
        rows.append({
            "row": name, "model": r["model"], "gmacs": r["gmacs"], "paper_xeon": pr["xeon"],
            "paper_graviton": pr["graviton"], "here": here,
            "here_min": r["throughput/images_per_s_min"],
            "here_max": r["throughput/images_per_s_max"], "here_over_xeon": here / pr["xeon"],
            "ratio_here": q["of_medians"], "ratio_here_min": q["per_round_min"],
            "ratio_here_max": q["per_round_max"],
            "ratio_xeon": pr["xeon"] / paper[ANCHOR]["xeon"],
            "ratio_graviton": pr["graviton"] / paper[ANCHOR]["graviton"],
            "mfu_pct": r["mfu_pct"], "fusion": describe_fusion(r["fusion"]),
            "others_pct_max": r["timing"]["others_pct_max"], "source": pr["source"]})
    for row in rows:
        row["ratio_diff"] = row["ratio_here"] / row["ratio_xeon"] - 1
    record["comparison"] = rows
    order_here = [r["row"] for r in sorted(rows, key=lambda r: -r["here"])]
    order_paper = [r["row"] for r in sorted(rows, key=lambda r: -r["paper_xeon"])]
    record["order"] = {"here": order_here, "paper_xeon": order_paper,
                       "same": order_here == order_paper}
    return record


# ------------------------------------------------------------------------------------------
# Part 2: the trainer's step vs a plain step


def trainer_items(args) -> tuple[list[Item], dict]:
    """Two copies of one model, one optimizer each, the same synthetic batches."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from repro.train.distributed import DistEnv
    from repro.train.loop import RunState, StepConfig, train_one_epoch
    from repro.train.optim import DistillationLoss

    torch.manual_seed(0)
    plain_model = create(args.train_model, args.train_res)
    trainer_model = copy.deepcopy(plain_model)
    classes = plain_model.num_classes
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.train_batch, 3, args.train_res, args.train_res, generator=gen),
                torch.randint(0, classes, (args.train_batch,), generator=gen))
               for _ in range(8)]
    opt = dict(opt="adamw", lr=1e-3, weight_decay=0.05)
    plain_opt = create_optimizer_v2(plain_model, **opt)
    trainer_opt = create_optimizer_v2(trainer_model, **opt)

    def plain(k: int) -> float:
        plain_model.train()
        for i in range(k):
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(plain_model(x), y)
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        return k * args.train_batch

    # What repro.train.run gives train_one_epoch for a plain recipe: one process, accum 1, fp32,
    # no mixup, EMA, clipping or distillation; a per-step cosine schedule.
    cfg = StepConfig(env=DistEnv(0, 1, 0, torch.device("cpu"), None), accum_steps=1)
    scheduler = CosineLRScheduler(trainer_opt, t_initial=10**6, warmup_t=100,
                                  warmup_lr_init=1e-6, t_in_epochs=False)
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.0, 1.0)
    state = RunState()

    def trainer(k: int) -> float:
        state.batch_in_epoch = 0  # each window is an epoch of k steps, as run.py's loop does
        epoch = [batches[i % len(batches)] for i in range(k)]
        train_one_epoch(trainer_model, epoch, trainer_opt, scheduler, loss_fn, state, cfg,
                        steps=k)
        return k * args.train_batch

    gmacs, params = count_gmacs(args.train_model, args.train_res, {})
    info = {"model": args.train_model, "res": args.train_res, "batch": args.train_batch,
            "gmacs": gmacs, "params_m": params / 1e6, "optimizer": "timm create_optimizer_v2 "
            "adamw, lr 1e-3, wd 0.05 (both)", "batches": f"{len(batches)} synthetic, cycled",
            "trainer_config": "StepConfig(accum_steps=1, amp none, no mixup/EMA/clip/scaler, "
            "log_every 50), CosineLRScheduler per step, DistillationLoss(kind none)"}
    return [Item("plain loop", plain, group="train"),
            Item("repro train_one_epoch", trainer, group="train")], info


def time_trainer(args) -> dict:
    """The plain loop and the trainer, interleaved, the same steps per window."""
    s = tp.Settings(device="cpu", threads=args.train_threads, batch=args.train_batch,
                    res=args.train_res, mode="train", warmup_s=args.warmup_s,
                    window_s=args.window_s, repeats=args.repeats, attempts=args.attempts,
                    retry_budget_s=args.retry_budget_s)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.train_threads)
    try:
        items, info = trainer_items(args)
        for item in items:
            item.info = {**info, "label": item.key, "role": item.key, "fusion": None,
                         "flops_per_image": 3 * 2 * info["gmacs"] * 1e9,
                         **figure_settings(s, args.train_batch)}
        peak = matmul_item("cpu", torch.float32)
        raw, budget_left = interleave([*items, peak], s)
        record = tp.summarise_run(items, peak, raw, s)
        record["retry_budget_left_s"] = budget_left
    finally:
        torch.set_num_threads(threads_before)
    record["ratio"] = ratio(raw, "repro train_one_epoch", "plain loop")
    record["info"] = info
    return record


def main(argv=None) -> int:
    """Time both parts and write the report and its JSON."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    from repro.io import atomic_write_json, atomic_write_text

    paper = paper_rows()
    print(f"waiting up to {args.initial_wait_s:g} s for a quiet machine ...", flush=True)
    initial = wait_for_quiet(args.initial_wait_s)
    print("1. LeViT CPU protocol", flush=True)
    levit = time_levit(args, paper)
    print("2. trainer vs plain step", flush=True)
    trainer = time_trainer(args)
    out = args.out.resolve()
    json_path = out.with_suffix(".json")
    report = {
        "command": shlex.join(["python", "benchmarks/throughput_cpu.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "json": str(json_path), "settings": vars(args) | {"out": str(args.out)},
        "initial_wait": initial, "paper": paper, "levit": levit, "trainer": trainer,
    }
    report["total_s"] = time.perf_counter() - t_start
    atomic_write_json(json_path, report)
    atomic_write_text(out, render(report))
    for r in levit["comparison"]:
        print(f"{r['row']:11s} {r['here']:7.1f} img/s (paper Xeon {r['paper_xeon']:g}); "
              f"/ {ANCHOR}: {r['ratio_here']:.2f} here, {r['ratio_xeon']:.2f} paper")
    print(f"trainer / plain: {trainer['ratio']['of_medians']:.3f}x")
    for what, rec in (("levit", levit), ("trainer", trainer)):
        load = rec["other_load"]
        print(f"{what}: {'quiet' if load['quiet'] else 'NOT QUIET'} (max others "
              f"{load['max_pct']:.1f} %, {load['retried']} re-timed)")
    print(f"wrote {out} and {json_path.name} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
