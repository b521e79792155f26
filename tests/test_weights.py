"""Checking a paper with its released weights (issue 15): the official LeViT naming read by
the names, ImageNet-ReaL and ImageNetV2 scoring, the `repro eval --row` record and its report.

The key lists in data/levit_official_state_dicts.json were dumped from the official
facebookresearch/LeViT levit.py@3772b8e for the five released sizes (their `{"model": ...}`
layout). The official code itself is not in this repository; building it beside timm's port,
with random weights, `from_official` gave a max |logit difference| of 0.0 for 128S, 256 and 384.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

import repro.models  # noqa: F401  (registers the suite's models)
from repro.data import DataError, builtin, imagenet_v2
from repro.data.beton import digest
from repro.data.real_labels import RealLabels
from repro.models import levit
from repro.recipe import load_recipe
from repro.report import results
from repro.train import evaluate
from repro.train.checkpoint import WeightsError, load_strict, problems, read_weights
from repro.train.run import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
GOLDEN = Path(__file__).resolve().parent / "golden/released.md"

DATA = Path(__file__).resolve().parent / "data"
OFFICIAL = json.loads((DATA / "levit_official_state_dicts.json").read_text())["models"]
SIZES = {"LeViT_128S": "levit_128s", "LeViT_128": "levit_128", "LeViT_192": "levit_192",
         "LeViT_256": "levit_256", "LeViT_384": "levit_384"}


def official_zeros(size: str) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape) for k, shape in OFFICIAL[size]}


def test_the_fixture_holds_the_five_released_sizes():
    assert set(OFFICIAL) == set(SIZES)
    assert all(levit.is_official(official_zeros(s)) for s in SIZES)
    assert not levit.is_official(timm.create_model("levit_128s").state_dict())


@pytest.mark.parametrize("size", list(SIZES))
def test_official_names_map_to_timms_for_every_size(size):
    state = official_zeros(size)
    model = timm.create_model(SIZES[size])
    mapped = levit.from_official(state)
    assert problems(model.state_dict(), mapped) == ""  # every key and shape
    dropped = [k for k in state if k.endswith("attention_bias_idxs")]
    assert len(mapped) == len(state) - len(dropped)  # nothing else is left behind
    # Blocks land by name: the last MLP of stage 2 is the official flat list's last block.
    last = max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    # Every size's stage 2 has four blocks.
    assert mapped["stages.2.blocks.3.mlp.ln2.linear.weight"] is \
        state[f"blocks.{last}.m.2.c.weight"]


def by_position(official: dict, model: torch.nn.Module) -> dict:
    """The check the issue describes, independent of the names: pair the official tensors
    with timm's in state-dict order (the two trees register modules in the same order)."""
    theirs = [k for k in official if not k.endswith(("attention_bias_idxs",
                                                       "num_batches_tracked"))]
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(theirs) == len(ours)
    return {o: official[t] for t, o in zip(theirs, ours, strict=True)}


def test_an_official_checkpoint_loads_strictly_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    # Random official-named weights, BatchNorm statistics included, saved as the releases are.
    official = {k: (torch.rand(shape) + 0.5 if k.endswith("running_var") else
                    torch.randn(shape) * 0.05) for k, shape in OFFICIAL["LeViT_128S"]}
    official = {k: v.long() if k.endswith(("idxs", "num_batches_tracked")) else v
                for k, v in official.items()}
    path = tmp_path / "LeViT-128S-96703c44.pth"
    torch.save({"model": official}, path)

    reference = timm.create_model("levit_128s").eval()
    reference.load_state_dict(by_position(official, reference), strict=False)
    weights = read_weights(path)
    model = timm.create_model("levit_128s").eval()
    notes = load_strict(model, weights.model, path=path, name="levit_128s")
    assert any("official LeViT names" in n for n in notes)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-5


def test_an_unknown_official_key_is_one_line_naming_it(tmp_path):
    state = official_zeros("LeViT_128S")
    state["blocks.3.m.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as e:
        load_strict(timm.create_model("levit_128s"), state, path=tmp_path / "x.pth")
    assert "\n" not in str(e.value) and "blocks.3.m.extra.weight" in str(e.value)


def test_pycls_and_safetensors_files_are_read(tmp_path):
    """pycls saves {"epoch", "model_state", "optimizer_state", "cfg"} (pycls/core/checkpoint.py
    @1151783), with "ema_state" in later versions; timm and the Hub publish safetensors."""
    from safetensors.torch import save_file

    model = timm.create_model("vit_c_nano", num_classes=10)
    state = model.state_dict()
    torch.save({"epoch": 99, "model_state": state, "ema_state": state, "optimizer_state": {},
                "cfg": "MODEL:\n  TYPE: vit\n"}, tmp_path / "model_epoch_0100.pyth")
    save_file(state, str(tmp_path / "model.safetensors"))
    pycls_w = read_weights(tmp_path / "model_epoch_0100.pyth")
    assert pycls_w.layout == "model_state + ema_state" and pycls_w.ema is not None
    safe = read_weights(tmp_path / "model.safetensors")
    assert safe.layout == "state dict" and safe.ema is None
    for weights in (pycls_w, safe):
        assert load_strict(timm.create_model("vit_c_nano", num_classes=10), weights.model,
                           path=tmp_path) == []


# ------------------------------------------------------------------------------------------
# ImageNet-ReaL


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_real_scoring_follows_timm_counted_by_hand(tmp_path):
    # Dataset order (by class folder) is not name order; the lists follow sorted names:
    # img_a [0], img_b [] (left out), img_c [1, 2] (two right answers), img_d [5].
    files = ["c1/img_b.png", "c0/img_c.png", "c0/img_a.png", "c2/img_d.png"]
    real = RealLabels(write_json(tmp_path / "real.json", [[0], [], [1, 2], [5]]), files, "val")
    assert real.labels == [[], [1, 2], [0], [5]]
    preds = [(0, [7, 7, 7, 7, 7]),  # img_b: no labels, not counted whatever it says
             (1, [2, 0, 0, 0, 0]),  # img_c: 2 is one of its labels -> top-1 right
             (2, [1, 3, 4, 0, 6]),  # img_a: top-1 wrong, top-5 right
             (3, [3, 4, 6, 7, 8])]  # img_d: both wrong
    assert real.score(preds) == {"real_top1": 100 / 3, "real_top5": 200 / 3, "real_count": 3}


def test_real_label_files_that_cannot_fit_are_one_line(tmp_path):
    files = ["a/x.png", "b/y.png"]
    for content, says in (("[[0], [1], [2]]", "3 label lists, but val has 2"),
                          ('{"x": [0]}', "expected a list of label lists"),
                          ("[[0], [", "not JSON")):
        (tmp_path / "real.json").write_text(content)
        with pytest.raises(DataError, match=says) as e:
            RealLabels(tmp_path / "real.json", files, "val")
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="file names are not known"):
        RealLabels(write_json(tmp_path / "real.json", [[0], [1]]), None, "val.beton")


# ------------------------------------------------------------------------------------------
# ImageNetV2


def test_v2_class_folders_are_read_as_integers_not_strings(tmp_path):
    """Eleven classes: as strings `10` sorts before `2`, and torchvision's ImageFolder would
    give the images of folder 10 the label 2 (and shift 2..9 up by one)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    for c in range(11):
        (tmp_path / str(c)).mkdir()
        Image.new("RGB", (8, 8), (c, c, c)).save(tmp_path / str(c) / f"{c}.jpeg")
    ds = imagenet_v2.dataset(tmp_path, None, num_classes=1000)
    assert dict((Path(p).parent.name, y) for p, y in ds.samples) == \
        {str(c): c for c in range(11)}
    naive = ImageFolder(str(tmp_path))
    assert dict((Path(p).parent.name, y) for p, y in naive.samples)["10"] == 2  # the bug
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(DataError, match="'n01440764' is not a class index"):
        imagenet_v2.dataset(tmp_path, None, num_classes=1000)
    shutil.rmtree(tmp_path / "n01440764")
    with pytest.raises(DataError, match="'10' is not a class index 0 .. 9"):
        imagenet_v2.dataset(tmp_path, None, num_classes=10)


# ------------------------------------------------------------------------------------------
# `repro eval RUN --real-labels --v2`, on both data paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    recipe = load_recipe(QUICKSTART, ["data.format=folder", "data.workers=0", "train.device=cpu",
                                      f"train.output_dir={tmp}/runs", "schedule.epochs=1",
                                      "schedule.warmup_epochs=0.2", "train.global_batch=32",
                                      "data.batch_size=32"], smoke=False)
    return train(recipe, progress=False)


def real_file(tmp_path: Path, val_dir: Path, empty_every: int = 0) -> tuple[Path, int]:
    """Synthetic ReaL labels for the digits validation set: each image's own class, in sorted
    file-name order; every `empty_every`-th list empty. Returns the file and the lists kept."""
    named = sorted((p.name, int(p.parent.name)) for p in val_dir.glob("*/*.png"))
    lists = [[] if empty_every and k % empty_every == 0 else [y]
             for k, (_, y) in enumerate(named)]
    return write_json(tmp_path / "real.json", lists), sum(map(bool, lists))


@pytest.mark.parametrize("fmt", ["folder", "ffcv"])
def test_eval_scores_real_and_v2_on_both_paths(trained, tmp_path, capsys, fmt):
    val_dir = builtin.ensure_digits(32).val_dir
    # With each image's own class as its only ReaL label, ReaL top-1 is top-1 exactly: the
    # lists reached the right images, in whatever order this path stores them.
    real, _ = real_file(tmp_path, val_dir)
    # The digits' class folders are named 0..9: an ImageNetV2-style folder as it is.
    assert evaluate.run_cli([str(trained), f"data.format={fmt}", "--real-labels", str(real),
                             "--v2", str(val_dir)]) == 0
    assert "ReaL top-1" in capsys.readouterr().out
    record = json.loads((trained / "eval.json").read_text())
    for prefix in ("eval", "eval_ema"):
        assert record[f"{prefix}/real_top1"] == record[f"{prefix}/top1"]
        assert record[f"{prefix}/real_count"] == record[f"{prefix}/count"] == 360
        assert record[f"{prefix}/v2_count"] == 360
    assert record["eval/top1"] > 15  # trained: misaligned labels would score near chance
    if fmt == "folder":  # the same images through the same transform
        assert record["eval/v2_top1"] == record["eval/top1"]
    # Empty lists are left out of the count.
    real, kept = real_file(tmp_path, val_dir, empty_every=4)
    assert evaluate.run_cli([str(trained), f"data.format={fmt}", "--real-labels",
                             str(real)]) == 0
    record = json.loads((trained / "eval.json").read_text())
    assert record["eval/real_count"] == kept == 270 and "eval/v2_top1" not in record


# ------------------------------------------------------------------------------------------
# `repro eval --row`: a paper's released weights, recorded apart from runs


def levit_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """The same random 10-class LeViT-128S weights saved as timm names them and as the
    official release does (renamed by position, independently of `from_official`)."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", num_classes=10)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    state = model.state_dict()
    names = [k for k, _ in OFFICIAL["LeViT_128S"]
             if not k.endswith(("attention_bias_idxs", "num_batches_tracked"))]
    ours = [k for k in state if not k.endswith("num_batches_tracked")]
    official = {o: state[t] for o, t in zip(names, ours, strict=True)}
    torch.save({"model": official}, tmp_path / "LeViT-128S-96703c44.pth")
    torch.save(state, tmp_path / "levit_128s.timm.pth")
    return tmp_path / "LeViT-128S-96703c44.pth", tmp_path / "levit_128s.timm.pth"


def test_released_weights_are_evaluated_under_the_rows_recipe_and_recorded(tmp_path, capsys):
    official, timm_file = levit_checkpoints(tmp_path)
    val_dir = builtin.ensure_digits(32).val_dir
    common = ["--data", str(val_dir), "model.num_classes=10", "data.workers=0",
              "train.device=cpu", f"train.output_dir={tmp_path}/runs", "eval.batch_size=120"]
    source = "https://dl.fbaipublicfiles.com/LeViT/LeViT-128S-96703c44.pth (test: random)"
    assert evaluate.run_cli(["--row", "levit/LeViT-128S", "--checkpoint", str(official),
                             "--source", source, *common]) == 0
    out = tmp_path / "runs/_released/levit/LeViT-128S/eval.json"
    rec = json.loads(out.read_text())
    assert rec["released"] == {"row": "levit/LeViT-128S", "source": source,
                               "file": official.name, "sha256": digest(official)}
    assert rec["model"] == "levit_128s" and rec["protocol"]["resolution"] == 224
    assert any("official LeViT names" in n for n in rec["key_mapping"])
    # The same weights in timm's names give the same outputs.
    assert evaluate.run_cli(["--row", "levit/LeViT-128S", "--checkpoint", str(timm_file),
                             *common]) == 0
    again = json.loads(out.read_text())
    assert again["released"]["source"] is None and again["key_mapping"] == []
    assert (again["eval/top1"], again["eval/top5"]) == (rec["eval/top1"], rec["eval/top5"])
    assert abs(again["eval/loss"] - rec["eval/loss"]) <= 1e-5
    assert not list((tmp_path / "runs").glob("*/*/results.json"))  # no run was made
    # Mistakes are one line.
    from repro.errors import UserError

    for row, says in (("levit/LeViT-999", "unknown row"),
                      ("coatnet/CoAtNet-4@512-jft300m", "not reproducible: pretrained on JFT")):
        with pytest.raises(UserError, match=says) as e:
            evaluate.run_cli(["--row", row, "--checkpoint", str(official), *common])
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit):
        evaluate.run_cli(["--row", "levit/LeViT-128S", *common])
    assert "--checkpoint" in capsys.readouterr().err


def test_the_released_weights_section_against_its_golden_file(tmp_path):
    """A record as `repro eval --row` writes it (numbers fixed by hand), rendered."""
    rec_dir = tmp_path / "runs/_released/levit/LeViT-256"
    rec_dir.mkdir(parents=True)
    write_json(rec_dir / "eval.json", {
        "date": "2026-12-03T00:00:00", "eval/top1": 81.52, "eval/real_top1": 86.71,
        "eval/v2_top1": 69.9, "released": {
            "row": "levit/LeViT-256", "file": "LeViT-256-13b5763e.pth",
            "sha256": "13b5763e" + "0" * 56,
            "source": "https://dl.fbaipublicfiles.com/LeViT/LeViT-256-13b5763e.pth"}})
    released = results.load_released([tmp_path / "runs"])
    assert list(released) == ["levit/LeViT-256"]
    md = results.render(results.load_runs([tmp_path / "runs"])[0], released=released,
                        command="repro report runs/")
    section = md[md.index("## Released weights"):]
    if os.environ.get("REPRO_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(section)
    assert section == GOLDEN.read_text(), "rerun with REPRO_UPDATE_GOLDEN=1 if meant"
    line = next(x for x in section.splitlines() if x.startswith("| LeViT-256 "))
    assert "81.52" in line and "matches the paper" in line and "13b5763e" in line
    rows = [x for x in section.splitlines() if x.startswith("| ") and not x.startswith("| row")]
    assert len(rows) > 40 and all("not evaluated" in x for x in rows if x != line)
