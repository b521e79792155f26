"""CvT (repro/models/cvt.py): official state-dict names, paper sizes, a tiny model trains."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import repro.models.cvt  # noqa: F401  (registers cvt_* with timm)

# The official CvT-13 state dict (microsoft/CvT lib/models/cls_cvt.py@f851e68 built with
# experiments/imagenet/cvt/cvt-13-224x224.yaml), written as data: stage -> (in_chans, dim,
# embed kernel, depth). Shapes are functions of the stage width d.
CVT13_STAGES = {0: (3, 64, 7, 1), 1: (64, 192, 3, 2), 2: (192, 384, 3, 10)}
BN = {
    "weight": "d",
    "bias": "d",
    "running_mean": "d",
    "running_var": "d",
    "num_batches_tracked": "",
}
BLOCK_KEYS = {
    "norm1.weight": "d",
    "norm1.bias": "d",
    **{f"attn.conv_proj_{p}.conv.weight": "d,1,3,3" for p in "qkv"},
    **{f"attn.conv_proj_{p}.bn.{k}": s for p in "qkv" for k, s in BN.items()},
    **{f"attn.proj_{p}.{k}": s for p in "qkv" for k, s in (("weight", "d,d"), ("bias", "d"))},
    "attn.proj.weight": "d,d",
    "attn.proj.bias": "d",
    "norm2.weight": "d",
    "norm2.bias": "d",
    "mlp.fc1.weight": "4d,d",
    "mlp.fc1.bias": "4d",
    "mlp.fc2.weight": "d,4d",
    "mlp.fc2.bias": "d",
}
# Counted by building the official module: CvT-13 has 459 state-dict entries and 19,997,480
# parameters (Table 2 prints 19.98M).
CVT13_NUM_KEYS, CVT13_NUM_PARAMS = 459, 19_997_480

PAPER_TABLE2 = {  # name: (params in M, FLOPs in G at 224), CvT paper Table 2
    "cvt_13": (19.98, 4.53),
    "cvt_21": (31.54, 7.13),
    "cvt_w24": (276.7, 60.86),
}


def _shape(spec: str, d: int, cin: int, k: int) -> tuple[int, ...]:
    sizes = {"d": d, "4d": 4 * d, "cin": cin, "k": k}
    return tuple(sizes[s] if s in sizes else int(s) for s in spec.split(",") if s)


def official_cvt13_shapes() -> dict[str, tuple[int, ...]]:
    expected = {}
    for i, (cin, d, k, depth) in CVT13_STAGES.items():
        if i == 2:
            expected["stage2.cls_token"] = (1, 1, d)
        for key, spec in (
            ("patch_embed.proj.weight", "d,cin,k,k"),
            ("patch_embed.proj.bias", "d"),
            ("patch_embed.norm.weight", "d"),
            ("patch_embed.norm.bias", "d"),
        ):
            expected[f"stage{i}.{key}"] = _shape(spec, d, cin, k)
        for j in range(depth):
            for key, spec in BLOCK_KEYS.items():
                expected[f"stage{i}.blocks.{j}.{key}"] = _shape(spec, d, cin, k)
    expected.update(
        {
            "norm.weight": (384,),
            "norm.bias": (384,),
            "head.weight": (1000, 384),
            "head.bias": (1000,),
        }
    )
    return expected


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


def test_cvt13_state_dict_matches_official_names_and_shapes():
    expected = official_cvt13_shapes()
    got = {k: tuple(v.shape) for k, v in meta_model("cvt_13").state_dict().items()}
    assert len(expected) == CVT13_NUM_KEYS
    assert sorted(set(got) - set(expected)) == [], "keys the official checkpoint lacks"
    assert sorted(set(expected) - set(got)) == [], "official keys missing"
    assert {k: s for k, s in got.items() if s != expected[k]} == {}


def test_cvt13_loads_an_official_shaped_state_dict_strictly():
    model = meta_model("cvt_13")
    model.load_state_dict(model.state_dict(), strict=True)
    assert sum(p.numel() for p in model.parameters()) == CVT13_NUM_PARAMS


@pytest.mark.parametrize("name", sorted(PAPER_TABLE2))
def test_params_within_1pct_of_paper_table2(name):
    params_m = sum(p.numel() for p in meta_model(name).parameters()) / 1e6
    assert params_m == pytest.approx(PAPER_TABLE2[name][0], rel=0.01)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE2))
def test_gmacs_within_5pct_of_paper_table2(name):
    model = meta_model(name)
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert gmacs == pytest.approx(PAPER_TABLE2[name][1], rel=0.05)


def test_drop_path_only_in_last_stage_rising_linearly():
    model = meta_model("cvt_13", drop_path_rate=0.2)
    rates = [
        [getattr(b.drop_path, "drop_prob", 0.0) for b in getattr(model, f"stage{i}").blocks]
        for i in range(3)
    ]
    assert rates[0] == [0.0] and rates[1] == [0.0, 0.0]
    assert rates[2][0] == 0.0 and rates[2][-1] == pytest.approx(0.2)
    steps = [b - a for a, b in zip(rates[2], rates[2][1:], strict=False)]
    assert steps == pytest.approx([0.2 / 9] * 9)


def test_paper_default_drop_path_and_cfg():
    assert meta_model("cvt_w24").stage2.blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    cfg = meta_model("cvt_13", num_classes=10).pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic" and cfg["first_conv"] == "stage0.patch_embed.proj"
    assert cfg["classifier"] == "head"


def test_pretrained_true_is_refused():
    with pytest.raises(ValueError, match="downloads no weights"):
        timm.create_model("cvt_13", pretrained=True)


def test_tiny_cvt_forward_backward_on_cpu():
    torch.manual_seed(0)
    model = timm.create_model("cvt_13", depths=(1, 1, 1), num_classes=10, drop_path_rate=0.1)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # The logits read only the cls token, whose query skips the conv projection, so the last
    # block's q conv projection reaches nothing downstream: zero gradient (official code too).
    params = ("conv.weight", "bn.weight", "bn.bias")
    dead = {f"stage2.blocks.0.attn.conv_proj_q.{k}" for k in params}
    zero = {n for n, p in model.named_parameters() if not p.grad.abs().sum()}
    assert zero == dead


def test_tiny_cvt_head_api_and_local_checkpoint(tmp_path):
    model = timm.create_model("cvt_13", depths=(1, 1, 1), num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    tokens = model.forward_features(x)
    assert tokens.shape == (1, 1 + 4 * 4, 384)  # cls token + the (64/16)^2 grid
    assert model.forward_head(tokens, pre_logits=True).shape == (1, model.num_features)
    path = tmp_path / "cvt_tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = timm.create_model(
        "cvt_13", depths=(1, 1, 1), num_classes=10, checkpoint_path=str(path)
    ).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (1, 3)
