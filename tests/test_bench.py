"""`repro bench` (repro.bench, repro.measure.throughput): figures, recorded settings, protocol,
BN folding; the interleaved timing and machine facts it shares with the benchmarks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from repro import bench as cli
from repro.measure import machine, steps, timing
from repro.measure import throughput as tp
from repro.measure.fuse import fuse_bn

TINY = ["--warmup-s", "0.05", "--window-s", "0.05", "--repeats", "2", "--attempts", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a small shared machine, idle cores are not a given."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bench(tmp_path, *args: str) -> dict:
    """Run `repro bench` in-process on tiny windows; its JSON record."""
    out = tmp_path / "bench.json"
    assert cli.run_cli([*args, *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so a wrong fold would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def test_bench_records_positive_figures_and_settings(tmp_path):
    rec = _bench(tmp_path, "vit_c_nano", "--device", "cpu", "--threads", "1", "--batch", "4",
                 "--res", "32", "--channels-last", "--reference", "recipes/quickstart.yaml",
                 "--out", str(tmp_path / "bench.md"))
    assert [r["role"] for r in rec["results"]] == ["target", "reference"]
    for r in rec["results"]:
        lo, mid, hi = (r[f"throughput/images_per_s{k}"] for k in ("_min", "", "_max"))
        assert all(math.isfinite(v) and v > 0 for v in (lo, mid, hi)) and lo <= mid <= hi
        assert {k: r[k] for k in ("device", "threads", "batch", "res", "dtype", "mode",
                                  "channels_last", "compile", "fuse_bn")} == {
            "device": "cpu", "threads": 1, "batch": 4, "res": 32, "dtype": "fp32",
            "mode": "infer", "channels_last": True, "compile": False, "fuse_bn": False}
        assert 0 < r["mfu_pct"] <= 100
        assert r["memory/max_rss_gib"] > 0 and r["gmacs"] > 0
    assert rec["results"][1]["recipe"] == "recipes/quickstart.yaml"
    assert rec["results"][1]["kwargs"] == {"num_classes": 10}  # the recipe's model
    ratio = rec["ratios"]["vit_c_nano / vit_c_nano (quickstart.yaml)"]
    assert ratio["per_round_min"] <= ratio["per_round_max"] and ratio["of_medians"] > 0
    assert rec["matmul_peak"]["gflops"] > 0
    assert {"timed_windows", "max_pct", "quiet"} <= set(rec["other_load"])
    assert rec["machine"]["cpu_count"] >= 1 and rec["versions"]["torch"] == torch.__version__
    md = (tmp_path / "bench.md").read_text()
    assert "Regenerate with `repro bench vit_c_nano" in md
    assert re.search(r"^\| vit_c_nano +\| +target +\|", md, re.M)


def test_train_mode_times_a_training_step(tmp_path):
    rec = _bench(tmp_path, "vit_c_nano", "--threads", "1", "--batch", "4", "--res", "32",
                 "--mode", "train", "--device", "cpu")
    (r,) = rec["results"]
    assert r["mode"] == "train" and r["throughput/images_per_s"] > 0
    assert r["flops_per_image"] == pytest.approx(3 * 2 * r["gmacs"] * 1e9)
    assert 0 < r["mfu_pct"] <= 100


def test_protocol_levit_sets_one_thread_and_batch_16_on_cpu(tmp_path):
    rec = _bench(tmp_path, "vit_c_nano", "--protocol", "levit", "--res", "32", "--device", "cpu")
    s = rec["settings"]
    assert (s["protocol"], s["threads"], s["batch"], s["amp"], s["fuse_bn"]) == (
        "levit", 1, 16, None, True)
    (r,) = rec["results"]
    assert (r["threads"], r["batch"], r["dtype"], r["fuse_bn"], r["protocol"]) == (
        1, 16, "fp32", True, "levit")
    assert r["fusion"]["conv_bn_pairs"] == 2 and r["fusion"]["batchnorm_left"] == 0
    assert any("speed_test.py" in n for n in s["notes"])


def test_protocol_levit_refuses_a_contradicting_option(capsys):
    assert cli.run_cli(["vit_c_nano", "--protocol", "levit", "--threads", "2",
                        "--device", "cpu"]) == 1
    assert "--protocol levit sets threads to 1" in capsys.readouterr().err


def test_unknown_model_is_a_one_line_error(capsys):
    assert cli.run_cli(["no_such_model_xyz", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0


class _Pairs(nn.Module):
    """Conv-BN pairs reached through attributes, one conv whose output is also used elsewhere."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.bn(self.conv(self.stem(x)))
        y = self.shared(x)
        return self.shared_bn(y) + y  # not foldable: the conv's output has two users


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else -self.body(x)


@pytest.mark.parametrize("make, pairs, method, left", [
    (_Pairs, 2, "torch.fx", 1),
    (_Untraceable, 1, "nn.Sequential", 0),
])
def test_fuse_bn_leaves_outputs_unchanged(make, pairs, method, left):
    torch.manual_seed(0)
    model = make().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 16, 16).abs()
    with torch.no_grad():
        before = model(x)
        record = fuse_bn(model)
        after = model(x)
    assert (record["conv_bn_pairs"], record["pair_method"], record["batchnorm_left"]) == (
        pairs, method, left)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_fuse_bn_uses_levits_own_fuse():
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", img_size=64).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        record = fuse_bn(model)
        after = model(x)
    assert set(record["fuse_methods"]) == {"ConvNorm", "LinearNorm", "NormLinear"}
    assert record["batchnorm_left"] == 0
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)


def test_out_of_memory_halves_the_batch(monkeypatch):
    class Hungry(nn.Linear):
        def forward(self, x):
            if x.shape[0] > 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1 TiB")
            return super().forward(x.flatten(1))

    monkeypatch.setattr(steps, "create", lambda name, res, **kw: Hungry(3 * res * res, 10))
    monkeypatch.setattr(steps, "count_gmacs", lambda name, res, kw: (1e-6, 100))
    item = steps.model_item(tp.Target("hungry", "hungry", 4, 8), tp.Settings(), log=lambda m: None)
    assert (item.info["batch_requested"], item.info["batch"]) == (8, 2)
    assert item.run(3) == 6


def test_interleave_rotates_and_keeps_what_an_item_reports():
    """The timing the benchmarks share: rounds rotate, a group times the same steps, and facts
    an item returns beside its units stay with the warm-up and each window."""
    calls = []

    def counter(key: str, per_step: float, facts: bool = False):
        def run(k: int):
            calls.append(key)
            return {"units": k * per_step, "note": key} if facts else k * per_step
        return run

    items = [timing.Item("a", counter("a", 4, facts=True), group="g"),
             timing.Item("b", counter("b", 2), group="g"), timing.Item("c", counter("c", 1))]
    plan = timing.Plan(warmup_s=0.0, warmup_steps=1, window_s=0.0, repeats=3, attempts=1)
    raw, _ = timing.interleave(items, plan, log=lambda m: None)
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # after 3 warm-ups
    assert raw["a"]["warmup"]["note"] == "a" and raw["a"]["warmup"]["units"] == 4
    assert [w["note"] for w in raw["a"]["windows"]] == ["a"] * 3
    assert "note" not in raw["b"]["windows"][0]
    assert [w["round"] for w in timing.used_windows(raw["c"])] == [0, 1, 2]
    q = timing.ratio(raw, "a", "b")
    assert q["per_round_min"] <= q["of_medians"] <= q["per_round_max"]
    assert timing.other_load(raw, list(raw), plan.quiet_pct)["timed_windows"] == 9


def test_run_facts_keep_env_json_keys():
    facts = machine.run_facts("cpu")
    assert set(facts) == {"versions", "git", "hardware"}
    assert facts["versions"]["torch"] == torch.__version__ and "ffcv" in facts["versions"]
    hw = facts["hardware"]
    assert {"host", "cpu", "cpu_count", "torch_threads", "gpus", "device"} <= set(hw)
    assert hw["device"] == "cpu" and hw["cpu_count"] >= 1


def test_committed_data_loading_report_is_rendered_from_its_json():
    from repro.report.data_loading import render

    reports = Path(__file__).resolve().parents[1] / "reports"
    saved = json.loads((reports / "data_loading.json").read_text())
    assert (reports / "data_loading.md").read_text() == render(saved)
