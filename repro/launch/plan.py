"""What a launch will do, shown before any GPU hour is spent: the resolved recipe, the values
derived from it for several world sizes, and the paper row it targets."""

from __future__ import annotations

from tabulate import tabulate

from repro import papers
from repro.recipe import Recipe, RecipeError, derive, path_report

# World sizes shown by --dry-run besides the recipe's own: a laptop, one node, a paper-scale job.
SHOWN_WORLD_SIZES = (1, 8, 64)


def target_lines(recipe: Recipe) -> list[str]:
    """The paper row a recipe reproduces, with every number's source."""
    if not recipe.row_id:
        return ["target     (none: this recipe names no paper row)"]
    row = papers.get_row(recipe.row_id)
    facts = []
    if row.get("top1") is not None:
        facts.append(f"top-1 {row['top1']}")
    if row.get("params_m") is not None:
        facts.append(f"params {row['params_m']} M")
    if row.get("gmacs") is not None:
        facts.append(f"{row['gmacs']} GMACs (the paper's 'FLOPs', multiply-adds)")
    facts.append(f"{row['resolution']} px")
    lines = [f"target     {recipe.row_id} ({row['model']}): " + ", ".join(facts),
             f"           source: {row['source']}"]
    if row.get("caveat"):
        lines.append(f"           caveat: {row['caveat']}")
    return lines


def derived_table(recipe: Recipe, world_sizes: list[int]) -> str:
    """A markdown table of per-device batch, accumulation and schedule per world size."""
    rows = []
    for ws in world_sizes:
        d = derive(recipe, ws)
        rows.append([ws, d.global_batch, d.per_device_batch, d.micro_batch, d.accum_steps,
                     f"{d.lr:.4g}", f"{d.min_lr:.3g}", d.steps_per_epoch, d.total_steps,
                     d.warmup_steps])
    head = ["world size", "global batch", "per device", "micro-batch", "accum steps",
            "peak lr", "final lr", "steps/epoch", "total steps", "warm-up steps"]
    return tabulate(rows, head, tablefmt="github")


def world_sizes_for(recipe: Recipe, extra: list[int] | None = None) -> list[int]:
    """The world sizes worth showing: 1, 8, 64, the recipe's own launch size, and any asked."""
    own = recipe.launch.nodes * recipe.launch.gpus_per_node
    sizes = {*SHOWN_WORLD_SIZES, own, *(extra or [])}
    return sorted(s for s in sizes if recipe.train.global_batch % s == 0)


def exact_eval(recipe: Recipe) -> bool:
    """Does the recipe's evaluation data give exactly its eval protocol? The folder loader
    does; on FFCV, an eval-protocol file for this protocol does (repro.data.convert)."""
    if recipe.data.format == "folder":
        return True
    from repro.data.beton import eval_protocol_of, protocol

    e = recipe.eval
    want = protocol(e.resolution or recipe.data.resolution, e.crop_pct, e.interpolation)
    return bool(recipe.data.val_path) and eval_protocol_of(recipe.data.val_path) == want


def path_lines(recipe: Recipe) -> list[str]:
    """What the recipe's data path cannot apply and applies differently (from the schema)."""
    not_applied, deviations = path_report(recipe, exact_eval=exact_eval(recipe))
    return [f"not applied: {', '.join(not_applied) or 'none'}",
            f"deviations: {'; '.join(deviations) or 'none'}"]


# The GPU-hour estimate of --dry-run. None of the papers gives GPU costs for most stages
# (CoAtNet prints TPU costs for its JFT rows only), so it is arithmetic, not a measurement:
# training costs 3 forward passes per image (forward + backward), a distillation teacher one
# more of its own, at the utilisation one paper's own figure implies: EarlyConv Table 2 trains
# ViT_C-18GF (17.7 GMACs) at 11.4 min per ImageNet-1K epoch on 8 V100s, i.e.
# 6 x 17.7e9 x 1,281,167 / (11.4 x 60 x 8 s) = 24.9 TFLOP/s per GPU, 20 % of a V100's 125 fp16
# TFLOP/s. Priced here for an A100 (312 dense bf16 TFLOP/s, NVIDIA's datasheet). Small models
# run far below it (LeViT-256's 1000 epochs took 3-5 days on 32 GPUs, papers/levit.yaml).
ASSUMED_PEAK_FLOPS = 312e12
ASSUMED_UTILISATION = 0.20
ESTIMATE_NOTE = (f"estimate: 3 forward passes per image (+1 teacher) at "
                 f"{ASSUMED_UTILISATION:.0%} of an A100's {ASSUMED_PEAK_FLOPS / 1e12:.0f} bf16 "
                 "TFLOP/s, the utilisation EarlyConv Table 2's ViT_C-18GF epoch time implies")
# ImageNet-21K (fall11) before the held-out split, for a recipe whose count comes from its file.
NOMINAL_IMAGES = {"imagenet21k": 14_197_122}


def gpu_hours(recipe: Recipe) -> float | None:
    """Estimated GPU-hours of a recipe's whole schedule (ESTIMATE_NOTE), or None when its
    training-set size is known only once the data are opened."""
    import torch

    from repro import models
    from repro.measure.complexity import count, count_model

    d = derive(recipe, 1, NOMINAL_IMAGES.get(recipe.data.dataset))
    if d.total_steps is None:
        return None
    steps = min(d.total_steps, recipe.train.max_steps or d.total_steps)
    res, m = recipe.data.resolution, recipe.model
    if m.kwargs:  # an architecture change: counted as built
        with torch.device("meta"):
            model = models.create(m.name, res, num_classes=m.num_classes, **m.kwargs)
        flops = 3 * count_model(model, res).flops
    else:  # counted once per process (a chain's stages share their parents)
        flops = 3 * count(m.name, res, m.num_classes).flops
    if recipe.distill.type != "none" and recipe.distill.teacher:
        flops += count(recipe.distill.teacher, res).flops
    return flops * steps * recipe.train.global_batch / \
        (ASSUMED_PEAK_FLOPS * ASSUMED_UTILISATION) / 3600


def _hours(h: float | None) -> str:
    return "GPU-hours unknown" if h is None else \
        f"~{h:,.0f} GPU-hours" if h >= 10 else f"~{h:.2g} GPU-hours"


def stage_lines(recipe: Recipe, smoke: bool = False) -> list[str]:
    """The compute line, and the chain of stages a fine-tune continues (`init.from`): each
    stage's epochs, world size, estimated GPU-hours and the run it provides (or that it runs
    first)."""
    from repro.train import stages

    chain = [*stages.chain(recipe, smoke), recipe]
    hours = [None if smoke else gpu_hours(s) for s in chain]
    if smoke:
        total = "(smoke: not estimated)"
    elif None in hours:
        total = "GPU-hours unknown until the data are opened (data.train_images: null)"
    else:
        total = f"{_hours(sum(hours))} in all ({ESTIMATE_NOTE})"
    lines = [f"compute    {total}"]
    if len(chain) == 1:
        return lines
    for i, stage in enumerate(chain):
        world = stage.launch.nodes * stage.launch.gpus_per_node
        head = (f"stage {i + 1}/{len(chain)}  {stage.path}  ({stage.schedule.epochs} epochs, "
                f"world size {world} = {stage.launch.nodes} x {stage.launch.gpus_per_node} GPUs"
                + ("" if smoke else f", {_hours(hours[i])}") + ")")
        if i + 1 < len(chain):
            parent = stages.find_parent(chain[i + 1], smoke)
            head += f": {parent.describe() if parent else 'no run yet: runs first'}"
            if parent is not None and not parent.good:
                head += "; the next stage is NON-CANONICAL"
        lines.append(head)
    return lines


def render(recipe: Recipe, extra_world_sizes: list[int] | None = None,
           smoke: bool = False) -> str:
    """The full dry-run text."""
    from repro import models

    try:
        models.check_name(recipe.model.name)
    except models.UnknownModel as e:
        raise RecipeError(recipe.path, "model.name", str(e)) from None
    status = "canonical" if recipe.canonical else (
        "NON-CANONICAL (scientific keys overridden: " + ", ".join(recipe.non_canonical_keys) + ")")
    lr_rule = (f"lr {recipe.optim.lr:g} quoted at batch {recipe.optim.lr_batch}, scaled linearly "
               f"to the global batch" if recipe.optim.lr_batch else
               f"lr {recipe.optim.lr:g} used as given (never rescaled by the number of devices)")
    own = recipe.launch.nodes * recipe.launch.gpus_per_node
    out = [
        f"recipe     {recipe.path}  [{status}]",
        *(f"override   {o}" for o in recipe.overrides),
        *target_lines(recipe),
        f"model      {recipe.model.name}",
        *stage_lines(recipe, smoke),
        f"launch     {recipe.launch.nodes} node(s) x {recipe.launch.gpus_per_node} GPU(s) = "
        f"world size {own} as a --cluster job on GPUs (locally: --nproc)",
        f"data       {recipe.data.format}",
        *path_lines(recipe),
        "",
        "# resolved recipe",
        recipe.to_yaml().rstrip(),
        "",
        f"# derived: global batch {recipe.train.global_batch} kept exactly by gradient "
        f"accumulation; {lr_rule}",
        derived_table(recipe, world_sizes_for(recipe, extra_world_sizes)),
    ]
    return "\n".join(out)
