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


def stage_lines(recipe: Recipe, smoke: bool = False) -> list[str]:
    """The chain of stages a fine-tune continues (`init.from`), with their runs."""
    from repro.train import stages

    return stages.describe_chain(recipe, smoke)


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
