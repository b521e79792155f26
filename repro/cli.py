"""The `repro` command line: one subcommand per job of the suite."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Subcommands whose module parses its own arguments (`run_cli(argv) -> int`).
DELEGATED = {
    "bench": ("repro.bench", "throughput: timm's method, the LeViT protocol, MFU"),
    "profile": ("repro.train.profile", "torch.profiler traces of a recipe's training steps"),
    "eval": ("repro.train.evaluate", "top-1/top-5 of a checkpoint with the recipe's protocol"),
}

EXIT_ERROR = 1  # bad input: a recipe, paper table or path problem, reported in one line
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


def _world_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"world sizes must be >= 1, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from repro.recipe import add_arguments as add_recipe_arguments

    p = argparse.ArgumentParser(
        prog="repro", description="Reproduce the tables of hybrid CNN-Transformer papers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    launch = sub.add_parser("launch", help="train a recipe (locally, or on Slurm)",
                            description="Train a recipe. Overrides: key.sub=value.")
    add_recipe_arguments(launch, "recipes/earlyconv_vitb.yaml",
                         "dotted overrides, values read as YAML")
    launch.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe, derived values and target; run nothing")
    launch.add_argument("--world-size", type=_world_sizes, default=None, metavar="N[,N...]",
                        help="also show derived values for these world sizes")
    launch.add_argument("--nproc", type=int, default=1,
                        help="local processes (DDP; gloo on CPU, NCCL on GPUs)")
    launch.add_argument("--run-id", default=None,
                        help="run id; relaunching an unfinished run's id resumes it")
    launch.add_argument("--cluster", metavar="PROFILE",
                        help="submit to Slurm with this cluster profile (slurm/clusters/*.yaml)")
    launch.add_argument("--nodes", type=int, default=None,
                        help="nodes for --cluster (default: the recipe's launch.nodes)")
    launch.add_argument("--array", metavar="seeds=0,1,2", default=None,
                        help="with --cluster: a job array, one run per seed")

    verify = sub.add_parser(
        "verify", help="params and FLOPs of every paper row against the paper",
        description="Count params and multiply-adds of every paper row's model on the meta "
        "device and compare with the paper (params within 1 %, FLOPs within 5 %).")
    verify.add_argument("--paper", help="only this paper (coatnet, levit, cvt, earlyconv)")
    verify.add_argument("--row", help="only this row of --paper, e.g. ViT_C-18GF")
    verify.add_argument("--out", default=None, metavar="MD",
                        help="report path (default reports/architecture.md, written only when "
                        "every row is checked)")

    data = sub.add_parser("data", help="FFCV conversion and the built-in dataset")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    conv = dsub.add_parser(
        "convert", help="ImageFolder tree -> FFCV .beton (+ <file>.json record)",
        description="Convert an ImageFolder tree (ImageNet's layout), or a folder of per-class "
        ".tar files (ImageNet-21K as distributed), to an FFCV .beton. DST may "
        "be a directory: the file is then named by its writer settings, e.g. "
        "train_500_0.50_90.beton.")
    conv.add_argument("src", help="ImageFolder root, e.g. /datasets/imagenet/train, or a "
                      "folder of per-class .tar files")
    conv.add_argument("dst", help=".beton file, or a directory for the default name")
    conv.add_argument("--max-res", type=int, default=500,
                      help="longest side stored, px (default 500; 0 = keep)")
    conv.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    conv.add_argument("--compress-prob", type=float, default=0.5,
                      help="share of images stored as JPEG, the rest raw (default 0.5)")
    conv.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    conv.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                      help="unreadable images: skip and list them (default), or stop")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    conv.add_argument("--labels", metavar="FILE", default=None,
                      help="SRC is a flat folder of images (ImageNet's validation set): label "
                      "them from FILE, a CSV of file,synset (e.g. LOC_val_solution.csv) or one "
                      "synset per line in sorted file-name order")
    conv.add_argument("--eval-protocol", metavar="RES,CROP_PCT,INTERP", default=None,
                      help="write an evaluation file: each image resized (shorter side to "
                      "RES / CROP_PCT, bilinear|bicubic) and centre-cropped to RES with PIL, as "
                      "the recipes' eval protocol does, stored raw; default name e.g. "
                      "val_224_0.875_bicubic.beton")
    conv.add_argument("--holdout", type=int, metavar="N", default=None,
                      help="SRC has no validation split (ImageNet-21K): leave N images per "
                      "class out of this training file, chosen by a hash of their names "
                      "(recorded in the sidecar)")
    conv.add_argument("--heldout-of", metavar="TRAIN_BETON", default=None,
                      help="write the images TRAIN_BETON's --holdout left out (with "
                      "--eval-protocol: the evaluation file)")
    check = dsub.add_parser("check", help="check a .beton against its conversion record "
                            "(size and sha256)")
    check.add_argument("beton", help=".beton file written by repro data convert")
    dig = dsub.add_parser("digits", help="build the built-in digits set (done on first use)")
    dig.add_argument("--size", type=int, default=32, help="image side in px (default 32)")

    report = sub.add_parser("report", help="the papers' tables beside measured runs, verdicts",
                            description="Markdown report of every paper row beside the runs "
                            "found under PATHS, with plots; re-renders every other report "
                            "beside it (architecture, throughput_cpu, data_loading, "
                            "augment_parity) from its saved JSON.")
    report.add_argument("paths", nargs="*", default=[],
                        help="run directories, or a folder of them (default runs/)")
    report.add_argument("--paper", help="only this paper")
    report.add_argument("--out", default="reports/results.md",
                        help="markdown path (default reports/results.md: the committed report; "
                        "its plots go to plots/ beside it)")

    status = sub.add_parser("status", help="state of local and Slurm runs")
    status.add_argument("path", nargs="?", default="runs", help="a run directory or runs/")

    sub.add_parser("doctor", help="versions, and what is missing with its install line")

    for name, (_, what) in DELEGATED.items():
        sp = sub.add_parser(name, help=what, add_help=False)  # its module has the help
        sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def cmd_launch(args) -> int:
    from repro.launch import local, plan
    from repro.recipe import load_recipe

    if args.cluster:
        return _launch_slurm(args)
    if args.array:
        raise SystemExit("repro launch: error: --array needs --cluster")
    recipe = load_recipe(args.recipe, args.overrides, smoke=args.smoke)
    if args.dry_run:
        print(plan.render(recipe, args.world_size, smoke=args.smoke))
        return 0
    if args.nproc < 1:
        raise SystemExit("repro launch: error: --nproc must be >= 1")
    from repro.train import stages

    for stage in stages.missing(recipe, args.smoke):  # a fine-tune's parents, first
        print(f"stage {stage.name}: no complete run to start from yet: training it first")
        local.launch(stage, nproc=args.nproc, smoke=args.smoke)
    path = local.launch(recipe, nproc=args.nproc, smoke=args.smoke, run_id=args.run_id)
    from repro.rundir import Run

    r = Run(path).results()
    if r is None:
        print(f"run ?: {path}  (no results.json)")
        return 0
    top1 = ", ".join(f"{k.removeprefix('final/')} {v:.2f}" for k, v in r.metrics.items()
                     if k.startswith("final/") and k.endswith("top1"))
    print(f"run {r.status}: {path}  (epochs {r.epochs_done}/{r.epochs_planned}, steps "
          f"{r.steps_done}; {top1 or 'no evaluation'})")
    return 0


def _seeds(text: str) -> list[int]:
    key, _, values = text.partition("=")
    try:
        seeds = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if key.strip() != "seeds" or not seeds:
        raise SystemExit(f"repro launch: error: --array expects seeds=0,1,2, got {text!r}")
    return seeds


def _launch_slurm(args) -> int:
    from repro.launch import slurm

    seeds = _seeds(args.array) if args.array else None
    records = slurm.submit(args.recipe, args.overrides, args.cluster, nodes=args.nodes,
                           smoke=args.smoke, run_id=args.run_id, seeds=seeds,
                           dry_run=args.dry_run)
    if args.dry_run:
        print(slurm.render_dry_run(records))
        return 0
    for r in records:
        after = f", after job {r['after']['job_id']} succeeds" if r["after"] else ""
        print(f"submitted job {r['job_id']}: {r['run_dir']}  (logs: {r['slurm_folder']}{after})")
    dirs = [r["run_dir"] for r in records]
    print("follow with: repro status " + (dirs[0] if len(dirs) == 1 else os.path.commonpath(dirs)))
    return 0


def cmd_report(args) -> int:
    from repro import papers
    from repro.io import atomic_write_text
    from repro.report import results

    if args.paper:
        papers.load_paper(args.paper)  # unknown paper: one-line error
    paths = [Path(p) for p in args.paths or ["runs"]]
    out = Path(args.out)
    if not args.paths and not paths[0].exists():
        # Nothing to tabulate here (e.g. a fresh clone): keep results.md, re-render the rest.
        print(f"no run directories under {paths[0]}/: {out} left as it is")
        return _rerender(out.parent)
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run directory")
    runs, skipped = results.load_runs(paths)
    for problem in skipped:
        print(f"repro report: warning: skipped {problem}", file=sys.stderr)
    plots = results.plot(runs, out.parent / "plots", rel_to=out.parent)
    command = "repro report " + " ".join(map(str, paths)) + (
        f" --paper {args.paper}" if args.paper else "") + f" --out {args.out}"
    atomic_write_text(out, results.render(runs, paper=args.paper, command=command, plots=plots,
                                          released=results.load_released(paths)))
    print(f"{len(runs)} run(s) -> {out} (plots in {out.parent / 'plots'})")
    return _rerender(out.parent)


def _rerender(reports_dir: Path) -> int:
    """Every other report is re-rendered from its saved JSON, never edited."""
    from repro.report import rerender

    for md in rerender(reports_dir):
        print(f"re-rendered {md} from {md.with_suffix('.json').name}")
    return 0


def cmd_status(args) -> int:
    from repro.launch import status
    from repro.rundir import RunError

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory")
    runs = status.find_runs(path)
    if not runs:
        print(f"no runs under {path}")
        return 0
    rows = []
    for run in runs:
        try:
            rows.append(status.describe(run))
        except RunError as e:  # one damaged run does not hide the others
            print(f"repro status: warning: skipped {e}", file=sys.stderr)
    print(status.render(rows))
    return 0


def cmd_verify(args) -> int:
    import time

    from repro.measure import verify
    from repro.report import architecture

    if args.row and not args.paper:
        raise SystemExit("repro verify: error: --row needs --paper")
    start = time.perf_counter()
    data = verify.run(args.paper, args.row)
    print(architecture.summary(data))
    out = args.out or (None if args.paper or args.row else architecture.DEFAULT_REPORT)
    if out:
        md, js = architecture.write(data, out)
        print(f"wrote {md} and {js}")
    print(f"counted {len(data['rows'])} rows in {time.perf_counter() - start:.1f} s")
    return 1 if verify.failures(data) else 0


def cmd_data(args) -> int:
    from repro import data

    if args.data_command == "digits":
        from repro.data import builtin

        paths = builtin.ensure_digits(size=args.size)
        print(f"digits ({args.size} px): {paths.train_dir}, {paths.val_dir}"
              + (f", {paths.train_beton}, {paths.val_beton}" if paths.train_beton.exists()
                 else " (no .beton: FFCV is not installed)"))
        return 0
    if args.data_command == "check":
        from repro.data.beton import verify

        if not Path(args.beton).is_file():
            raise FileNotFoundError(f"{args.beton}: no such .beton file")
        side = verify(args.beton, full=True)
        if side is None or "sha256" not in side:
            raise data.DataError(f"{args.beton}: no size or checksum recorded in "
                                 f"{args.beton}.json (converted before they were): nothing to "
                                 "check against")
        print(f"{args.beton}: {side['size']} bytes, sha256 {side['sha256'][:16]}…: matches its "
              "conversion record")
        return 0
    if not data.ffcv_available():
        raise data.DataError("repro data convert needs FFCV: `make install`, or apt-get install "
                             "libopencv-dev libturbojpeg0-dev pkg-config && pip install -e "
                             "'.[ffcv]'")
    from repro.data.beton import sidecar_path
    from repro.data.convert import convert

    protocol = None
    if args.eval_protocol:
        parts = args.eval_protocol.split(",")
        try:
            protocol = (int(parts[0]), float(parts[1]), parts[2])
        except (ValueError, IndexError):
            raise data.DataError(f"--eval-protocol {args.eval_protocol}: expected "
                                 "RES,CROP_PCT,INTERP, e.g. 224,0.875,bicubic") from None
    record = convert(args.src, args.dst, max_res=args.max_res or None, quality=args.quality,
                     compress_prob=args.compress_prob, workers=args.workers,
                     on_error=args.on_error, overwrite=args.overwrite, eval_protocol=protocol,
                     labels=args.labels, holdout=args.holdout, heldout_of=args.heldout_of)
    dst = record["destination"]
    print(f"wrote {dst}: {record['num_images']} images, {record['num_classes']} classes; "
          f"skipped {record['skipped_count']} unreadable (listed in {sidecar_path(dst)})")
    return 0


def cmd_doctor(args) -> int:
    from repro import doctor

    return doctor.run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module = importlib.import_module(DELEGATED[argv[0]][0])
        return _guarded(argv[0], lambda: module.run_cli(argv[1:]))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`launch R.yaml --dry-run optim.lr=1e-3`).
    if args.command == "launch" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = {"launch": cmd_launch, "verify": cmd_verify, "data": cmd_data,
               "status": cmd_status, "report": cmd_report, "doctor": cmd_doctor}
    return _guarded(args.command, lambda: handler[args.command](args))


def _guarded(command: str, fn) -> int:
    """Run a subcommand; errors about the user's input become one line and exit 1."""
    from repro.errors import UserError

    try:
        return fn()
    except (UserError, FileNotFoundError) as e:
        print(f"repro {command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"repro {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
