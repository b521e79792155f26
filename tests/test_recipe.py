"""Recipe loading: inheritance, interpolation, overrides, errors, derived values."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from repro.recipe import RecipeError, derive, load_recipe, parse_override

MINIMAL = """
model: {name: vit_c_1gf}
optim: {lr: 1.0e-3, weight_decay: 0.05}
schedule: {epochs: 10, warmup_epochs: 1}
train: {global_batch: 256}
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path, overrides=()) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return info.value


# ---------------------------------------------------------------------------------- _base_

def test_base_list_merges_left_to_right_and_own_keys_win(tmp_path):
    write(tmp_path, "_base/a.yaml", """
        model: {name: from_a, drop_path: 0.1}
        optim: {lr: 1.0, weight_decay: 0.5}
        schedule: {epochs: 1}
        train: {global_batch: 64, label_smoothing: 0.1}
    """)
    write(tmp_path, "_base/b.yaml", """
        model: {name: from_b}
        optim: {lr: 2.0}
    """)
    path = write(tmp_path, "r.yaml", """
        _base_: [_base/a.yaml, _base/b.yaml]
        optim: {lr: 3.0}
    """)
    r = load_recipe(path)
    assert r.model.name == "from_b"  # b after a
    assert r.model.drop_path == 0.1  # mappings merge key by key: a's sibling key survives
    assert r.optim.lr == 3.0  # own keys last
    assert r.optim.weight_decay == 0.5
    assert r.train.label_smoothing == 0.1


def test_base_as_string_and_nested_bases(tmp_path):
    write(tmp_path, "_base/root.yaml", MINIMAL)
    write(tmp_path, "_base/mid.yaml", "_base_: root.yaml\nmodel: {drop_path: 0.2}\n")
    path = write(tmp_path, "r.yaml", "_base_: _base/mid.yaml\n")
    r = load_recipe(path)
    assert (r.model.name, r.model.drop_path, r.schedule.epochs) == ("vit_c_1gf", 0.2, 10)


def test_missing_base_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "r.yaml", "_base_: [nope.yaml]\n" + MINIMAL)
    e = load_error(path)
    assert e.file.endswith("r.yaml") and e.key == "_base_"
    assert "nope.yaml" in str(e) and "not found" in str(e)


def test_cyclic_base_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    e = load_error(tmp_path / "a.yaml")
    assert e.key == "_base_" and "cyclic" in str(e)
    assert "a.yaml -> b.yaml -> a.yaml" in str(e)


def test_error_in_a_base_file_names_that_file(tmp_path):
    write(tmp_path, "_base/bad.yaml", "optim: {weight_decay: lots}\n")
    path = write(tmp_path, "r.yaml", "_base_: _base/bad.yaml\n" + MINIMAL.replace(
        ", weight_decay: 0.05", ""))
    e = load_error(path)
    assert e.file.endswith("bad.yaml") and e.key == "optim.weight_decay"


# ------------------------------------------------------------------------- interpolation

def test_env_interpolation_with_and_without_default(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_TEST_DATA", "/datasets")
    monkeypatch.delenv("REPRO_TEST_UNSET", raising=False)
    path = write(tmp_path, "r.yaml", MINIMAL + textwrap.dedent("""
        data:
          train_path: ${REPRO_TEST_DATA}/in1k/train.beton
          val_path: ${REPRO_TEST_UNSET:-/fallback}/val.beton
    """))
    r = load_recipe(path)
    assert r.data.train_path == "/datasets/in1k/train.beton"
    assert r.data.val_path == "/fallback/val.beton"


def test_unset_env_var_without_default_names_file_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("REPRO_TEST_UNSET", raising=False)
    path = write(tmp_path, "r.yaml", MINIMAL + "data:\n  train_path: ${REPRO_TEST_UNSET}/x\n")
    e = load_error(path)
    assert e.key == "data.train_path" and "REPRO_TEST_UNSET" in str(e)
    assert e.file.endswith("r.yaml")


# ----------------------------------------------------------------------------- overrides

@pytest.mark.parametrize("text, key, value", [
    ("optim.lr=5e-4", "optim.lr", 5e-4),
    ("train.global_batch=1024", "train.global_batch", 1024),
    ("train.ema=null", "train.ema", None),
    ("train.channels_last=true", "train.channels_last", True),
    ("data.mean=[0.5, 0.5, 0.5]", "data.mean", [0.5, 0.5, 0.5]),
    ("model.name=levit_256", "model.name", "levit_256"),
    ("data.train_path=/a b/c", "data.train_path", "/a b/c"),
])
def test_override_values_are_read_as_yaml(text, key, value):
    assert parse_override(text) == (key, value)


def test_overrides_are_typed_and_applied(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    r = load_recipe(path, ["optim.lr=2", "optim.betas=[0.9, 0.95]", "train.amp=bf16"])
    assert r.optim.lr == 2.0 and isinstance(r.optim.lr, float)  # int accepted for a float key
    assert r.optim.betas == [0.9, 0.95]
    assert r.train.amp == "bf16"


def test_override_with_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    e = load_error(path, ["train.global_batch=big"])
    assert e.key == "train.global_batch" and "expected int" in str(e)
    assert "override 'train.global_batch=big'" in str(e) and "r.yaml" in str(e)


def test_malformed_override(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    e = load_error(path, ["optim.lr"])
    assert "key.sub=value" in str(e) and e.file.endswith("r.yaml")


def test_unknown_override_key_suggests(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    e = load_error(path, ["optim.weight_dcay=0.1"])
    assert e.key == "optim.weight_dcay" and "did you mean 'optim.weight_decay'" in str(e)


def test_scientific_override_marks_run_non_canonical(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert load_recipe(path).canonical
    r = load_recipe(path, ["optim.lr=5e-4", "data.workers=2", "train.seed=3"])
    assert not r.canonical and r.non_canonical_keys == ["optim.lr"]


def test_non_scientific_overrides_and_same_value_stay_canonical(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    r = load_recipe(path, ["data.workers=2", "data.train_path=/x", "launch.nodes=4",
                           "train.amp=bf16", "optim.lr=1e-3"])
    assert r.canonical, r.non_canonical_keys


# -------------------------------------------------------------------------------- errors

def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "schedule: {epochs: 10, warmup_epoch: 5}\n")
    e = load_error(path)
    assert e.file.endswith("r.yaml") and e.key == "schedule.warmup_epoch"
    assert "unknown key" in str(e) and "did you mean 'schedule.warmup_epochs'" in str(e)


def test_key_in_the_wrong_section_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "train: {global_batch: 256, weight_decay: 0.1}\n")
    e = load_error(path)
    assert e.key == "train.weight_decay" and "optim.weight_decay" in str(e)


def test_unknown_section(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "optimizer: {lr: 1}\n")
    e = load_error(path)
    assert e.key == "optimizer" and "did you mean 'optim'" in str(e)


@pytest.mark.parametrize("line, key, words", [
    ("optim: {lr: fast}", "optim.lr", "expected float"),
    ("train: {global_batch: 256.5}", "train.global_batch", "expected int"),
    ("train: {global_batch: 256, channels_last: yes please}", "train.channels_last",
     "expected bool"),
    ("data: {mean: 0.5}", "data.mean", "expected list of float"),
    ("model: 7", "model", "expected a mapping"),
])
def test_wrong_type_names_key(tmp_path, line, key, words):
    path = write(tmp_path, "r.yaml", MINIMAL + line + "\n")
    e = load_error(path)
    assert e.key == key and words in str(e) and e.file.endswith("r.yaml")


@pytest.mark.parametrize("line, key, words", [
    ("optim: {lr: -1.0}", "optim.lr", "must be > 0"),
    ("optim: {lr: 1.0, name: adamx}", "optim.name", "choose one of adamw, sgd"),
    ("train: {global_batch: 256, amp: fp8}", "train.amp", "bad value"),
    ("aug: {mixup_prob: 1.5}", "aug.mixup_prob", "within [0, 1]"),
    ("data: {mean: [0.5, 0.5]}", "data.mean", "exactly 3"),
    ("schedule: {epochs: 10, min_lr: 1.0e-5, min_lr_ratio: 0.01}", "schedule.min_lr_ratio",
     "not both"),
    ("schedule: {epochs: 10, warmup_lr: 1.0e-5, warmup_lr_ratio: 0.1}",
     "schedule.warmup_lr_ratio", "not both"),
    ("distill: {type: hard}", "distill.teacher", "no teacher"),
])
def test_bad_value_names_key(tmp_path, line, key, words):
    path = write(tmp_path, "r.yaml", MINIMAL + line + "\n")
    e = load_error(path)
    assert e.key == key and words in str(e)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL.replace("optim: {lr: 1.0e-3, weight_decay: 0.05}",
                                                     "optim: {weight_decay: 0.05}"))
    e = load_error(path)
    assert e.key == "optim.lr" and "missing required key" in str(e)


def test_yaml_syntax_error_has_line_number(tmp_path):
    path = write(tmp_path, "r.yaml", "model: {name: vit\noptim:\n  lr: [1, 2\n")
    e = load_error(path)
    assert "YAML syntax error" in str(e) and e.file.rsplit(":", 1)[1].isdigit()
    assert e.file.startswith(str(path))


def test_recipe_file_not_found(tmp_path):
    e = load_error(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(e) and "not found" in str(e)


def test_unknown_paper_row_is_an_error_with_suggestion(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "paper: earlyconv\nrow: ViT_C-18G\n")
    e = load_error(path)
    assert e.key == "row" and "ViT_C-18GF" in str(e)


def test_yaml_1_2_floats(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL.replace("1.0e-3", "1e-3"))
    assert load_recipe(path).optim.lr == pytest.approx(1e-3)


# -------------------------------------------------------------------------- derived values

@pytest.mark.parametrize("world, micro_cap, per_device, micro, accum", [
    (1, 128, 2048, 128, 16),
    (8, 128, 256, 128, 2),
    (64, 128, 32, 32, 1),
    (16, 128, 128, 128, 1),
    (8, 96, 256, 64, 4),  # 256 in 3 passes is not whole: 4 passes of 64
    (32, 48, 64, 32, 2),
])
def test_accumulation_keeps_the_global_batch(tmp_path, world, micro_cap, per_device, micro,
                                             accum):
    path = write(tmp_path, "r.yaml", MINIMAL.replace("256", "2048"))
    r = load_recipe(path, [f"data.batch_size={micro_cap}"])
    d = derive(r, world)
    assert (d.per_device_batch, d.micro_batch, d.accum_steps) == (per_device, micro, accum)
    assert d.micro_batch * d.accum_steps * d.world_size == r.train.global_batch
    assert d.micro_batch <= micro_cap


def test_world_size_that_does_not_divide_the_batch(tmp_path):
    r = load_recipe(write(tmp_path, "r.yaml", MINIMAL))
    with pytest.raises(RecipeError, match="train.global_batch: 256 is not divisible by world "
                                          "size 3"):
        derive(r, 3)


def test_effective_lr_follows_the_explicit_rule_only(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    plain = load_recipe(path, ["train.global_batch=8192", "optim.lr=5e-4"])
    assert derive(plain, 1).lr == pytest.approx(5e-4)  # no lr_batch: never rescaled
    assert derive(plain, 32).lr == pytest.approx(5e-4)  # ...in particular not by GPU count
    scaled = load_recipe(path, ["train.global_batch=8192", "optim.lr=5e-4",
                                "optim.lr_batch=512"])
    assert derive(scaled, 32).lr == pytest.approx(8e-3)  # LeViT's main.py rule


def test_schedule_lengths(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL.replace("256", "2048"))
    r = load_recipe(path, ["schedule.epochs=400", "schedule.warmup_epochs=5",
                           "schedule.min_lr_ratio=0.005"])
    d = derive(r, 8)
    assert d.steps_per_epoch == 1_281_167 // 2048 == 625
    assert d.total_steps == 625 * 400 and d.warmup_steps == 5 * 625
    assert d.min_lr == pytest.approx(1e-3 * 0.005)
    steps = load_recipe(path, ["schedule.warmup_steps=10000"])
    assert derive(steps, 1).warmup_steps == 10000


def test_a_warm_up_ratio_follows_the_lr_as_pycls_warmup_factor_does():
    """pycls starts warm-up at WARMUP_FACTOR x the lr (core/optimizer.py get_epoch_lr): at the
    paper's batch 0.1 x 1e-3; at a batch that scales the lr down, the start scales with it (an
    absolute start above the peak would warm *down*), and the scheduler starts there."""
    from repro.models import create
    from repro.train.optim import build_optimizer, build_scheduler

    root = Path(__file__).resolve().parents[1]
    paper = load_recipe(root / "recipes" / "earlyconv_vitb.yaml")
    d = derive(paper, 16)
    assert d.lr == pytest.approx(1e-3) and d.warmup_lr == pytest.approx(1e-4)
    small = load_recipe(root / "recipes" / "earlyconv_vitt.yaml",
                        ["train.global_batch=128", "data.batch_size=128"])
    d = derive(small, 1)
    assert d.lr == pytest.approx(1e-3 * 128 / 2048) and d.warmup_lr == pytest.approx(0.1 * d.lr)
    opt = build_optimizer(create("vit_c_nano", 32, num_classes=10), small, d.lr)
    build_scheduler(opt, small, d)
    assert opt.param_groups[0]["lr"] == pytest.approx(d.warmup_lr)
