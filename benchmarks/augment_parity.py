"""Device augmentation vs timm's PIL transforms: op by op, policy by policy, and in training.

Writes `reports/augment_parity.md` and `reports/augment_parity.json`:

1. Every op of repro.data.augment against timm's own op function (timm 1.0.31 on Pillow 13) on
   real photographs (crops of the two scikit-learn ships, rescaled to 224 x 168 and 97 x 131),
   at magnitudes 0, 4.5, 9, 10 and 15, both signs, bilinear and bicubic, for both backends (the
   numba CPU kernels and the torch ops a GPU runs): the largest difference in uint8 levels and
   the share of pixels that differ.
2. Each policy's draws against timm's transform over 60,000 draws (the statistical tests of
   tests/test_augment.py: chi-square on op choice per layer and application per op, two-sample
   Kolmogorov-Smirnov on each op's argument), with their smallest p-values.
3. Training parity: the quickstart recipe with the DeiT block (rand-m9-mstd0.5-inc1, random
   erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing as the recipe has it), trained through
   FFCV + device augmentation and through ImageFolder + timm PIL, `--seeds` seeds each: final
   top-1 mean +- std per path and a Welch t-test between them.

Usage: python benchmarks/augment_parity.py [--seeds 3] [--epochs 40]
           [--skip-training | --reuse-training]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' reference helpers (timm instrumented)

DEIT = ["aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.re_prob=0.25", "aug.re_mode=pixel",
        "aug.mixup=0.8", "aug.cutmix=1.0"]
POLICIES = ["rand-m9-mstd0.5-inc1", "rand-n2-m15-mmax15", "v0", "original-mstd0.5",
            "rand-n3-m7-mstd100-p0.7"]


def op_table() -> list[dict]:
    from test_augment import FILL, LEVELS, as_batch, photos, timm_op

    from repro.data import augment_ops as O

    backends = ["auto", "torch"] if O.cpu_kernels(torch.zeros(1, 3, 1, 1), {}) else ["torch"]
    sets = [photos(8, size=(224, 168)), photos(8, size=(97, 131))]
    rows = []
    for name, op in sorted(O.OPS.items()):
        for interp in ("bilinear", "bicubic"):
            for backend in backends:
                worst, differ, total = 0, 0, 0
                for imgs in sets:
                    batch = as_batch(imgs)
                    h, w = batch.shape[-2:]
                    hp = {"translate_const": int(min(h, w) * 0.45), "translate_pct": 0.45,
                          "fill": torch.tensor(FILL, dtype=torch.uint8),
                          "interpolation": interp, "backend": backend}
                    for level in LEVELS:
                        for sign in (1.0, -1.0):
                            n = len(imgs)
                            arg = torch.zeros(n, dtype=torch.float64)
                            if op.level_fn is not None:
                                arg = op.level_fn(torch.full((n,), level, dtype=torch.float64),
                                                  torch.full((n,), sign, dtype=torch.float64),
                                                  hp)
                            ours = op.fn(batch, arg, hp)
                            for i, img in enumerate(imgs):
                                if name.startswith("Posterize") and arg[i] <= 0:
                                    ref = np.zeros_like(np.asarray(img))  # Pillow < 13 / TF
                                else:
                                    ref = np.asarray(timm_op(name, img, float(arg[i]), interp))
                                d = np.abs(ours[i].permute(1, 2, 0).numpy().astype(int)
                                           - ref.astype(int))
                                worst = max(worst, int(d.max()))
                                differ += int((d > 0).sum())
                                total += d.size
                rows.append({"op": name, "interpolation": interp, "backend": backend,
                             "max_levels": worst, "differing_pct": 100 * differ / total,
                             "values": total})
    return rows


def distribution_tests(draws: int = 60_000) -> list[dict]:
    """The smallest p-value of each family of tests/test_augment.distribution_tests."""
    from test_augment import distribution_tests as tests

    out = []
    for spec in POLICIES:
        r = tests(spec, draws)
        out.append({"policy": spec, "draws": draws,
                    "applied_ours_pct": r["applied_pct"][0],
                    "applied_timm_pct": r["applied_pct"][1],
                    "min_p_choice": min(p for _, p in r["choice"]),
                    "min_p_applied": min(p for _, p in r["applied"]),
                    "min_p_argument": min((p for _, p in r["argument"]), default=None),
                    "tests": sum(len(r[k]) for k in ("choice", "applied", "argument"))})
    return out


def training_parity(seeds: int, epochs: int, workdir: Path) -> dict:
    """`repro launch` of the quickstart recipe with the DeiT block, per path and seed."""
    from scipy import stats

    results: dict = {"ffcv": [], "folder": []}
    for seed in range(seeds):
        for fmt in results:
            out = workdir / fmt
            cmd = [str(Path(sys.executable).with_name("repro")), "launch",
                   str(ROOT / "recipes/quickstart.yaml"),
                   *DEIT, f"data.format={fmt}", f"schedule.epochs={epochs}",
                   f"train.seed={seed}", f"train.output_dir={out}",
                   f"train.run_id=s{seed}"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads((out / "quickstart" / f"s{seed}" / "results.json").read_text())
            results[fmt].append({"seed": seed, "top1": r["final/eval/top1"],
                                 "ema_top1": r.get("final/eval_ema/top1"),
                                 "seconds": time.perf_counter() - t0,
                                 "not_applied": r["not_applied"],
                                 "deviations": r["deviations"]})
            print(f"  {fmt} seed {seed}: top-1 {r['final/eval/top1']:.2f}", flush=True)
    summary = {}
    for fmt, runs in results.items():
        top1 = [x["top1"] for x in runs]
        summary[fmt] = {"mean": statistics.mean(top1),
                        "std": statistics.stdev(top1) if len(top1) > 1 else 0.0, "n": len(top1)}
    a = [x["top1"] for x in results["ffcv"]]
    b = [x["top1"] for x in results["folder"]]
    welch = stats.ttest_ind(a, b, equal_var=False) if len(a) > 1 else None
    return {"runs": results, "summary": summary, "epochs": epochs,
            "welch_p": float(welch.pvalue) if welch is not None else None,
            "overrides": DEIT}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40, help="the quickstart recipe's own 40")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--reuse-training", action="store_true",
                   help="keep the training section of the existing JSON beside --out")
    p.add_argument("--out", type=Path, default=ROOT / "reports/augment_parity.md")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    from importlib.metadata import version

    from repro.data import cache_dir
    from repro.io import atomic_write_json, atomic_write_text
    from repro.report.augment_parity import render

    t0 = time.perf_counter()
    rep = {"command": " ".join(["python", "benchmarks/augment_parity.py",
                                *(sys.argv[1:] if argv is None else argv)]),
           "versions": {d: version(d) for d in ("timm", "Pillow", "torch", "numba")}}
    print("ops ...", flush=True)
    rep["ops"] = op_table()
    print("distributions ...", flush=True)
    rep["distributions"] = distribution_tests()
    if args.skip_training and args.reuse_training:
        p.error("--skip-training or --reuse-training, not both")
    out = args.out.resolve()
    if args.reuse_training:
        try:
            old = json.loads(out.with_suffix(".json").read_text())
            rep["training"] = old["training"]
        except (OSError, ValueError, KeyError):
            p.error(f"--reuse-training: no training section in {out.with_suffix('.json')}")
        rep["training_reused"] = old.get("training_command", old["command"])
    elif not args.skip_training:
        rep["training_command"] = rep["command"]
        print("training ...", flush=True)
        workdir = (args.workdir or cache_dir() / "augment_parity").resolve()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        rep["training"] = training_parity(args.seeds, args.epochs, workdir)
    rep["total_s"] = time.perf_counter() - t0
    atomic_write_json(out.with_suffix(".json"), rep)
    atomic_write_text(out, render(rep))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
