"""The papers' models: they build, train a step, and match the papers' params and FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import repro.models  # noqa: F401  (registers the models)
from repro import papers
from repro.cli import main
from repro.measure import complexity, verify
from repro.report.architecture import render

ROOT = Path(__file__).resolve().parents[1]

# Every model of the papers' families, at the test size its family module declares (`SMALL`:
# ordinary constructor keywords, so the paper configuration itself is never edited).
MODELS = repro.models.suite_models()
RES = 64


def test_every_model_the_tables_name_is_registered():
    names = set(papers.load_rows()["timm_model"].dropna())
    missing = sorted(n for n in names if not timm.is_model(n))
    assert not missing
    # every model of the papers' families is in MODELS, so it is tested at small size below
    ours = {n for n in names if not n.startswith(("deit", "efficientnet"))}
    assert ours <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_model_trains_a_step_at_small_size(name):
    torch.manual_seed(0)
    model = repro.models.create(name, RES, num_classes=10, **repro.models.small_kwargs(name))
    model.train()
    x = torch.randn(2, 3, RES, RES)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.float().logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_model_files_open_with_paper_and_arxiv():
    for path in (ROOT / "repro/models").glob("*.py"):
        if path.name == "__init__.py":
            continue
        doc = path.read_text().split('"""')[1]
        assert "arXiv:" in doc, path.name


def test_meta_count_equals_real_count_without_fused_attention():
    kwargs = {"depth": 2}
    with torch.device("meta"):
        meta_model = timm.create_model("vit_c_1gf", **kwargs)
    meta = complexity.count_model(meta_model, 224)
    real = complexity.count_real("vit_c_1gf", 224, **kwargs)
    assert meta.device == "meta" and real.device == "cpu"
    assert (meta.params, meta.flops) == (real.params, real.flops)
    # Why the meta device: on real CPU tensors the fused attention kernel is not counted.
    fused = complexity.count_real("vit_c_1gf", 224, fused=True, **kwargs)
    assert fused.flops < real.flops


def test_gmacs_are_half_the_counted_flops():
    c = complexity.count("levit_128s", 224)
    assert c.gmacs == pytest.approx(c.flops / 2e9)
    assert 0.30 < c.gmacs < 0.31  # LeViT-128S: 305 MFLOPs (multiply-adds) in Table 3


@pytest.fixture(scope="module")
def verified():
    return verify.run()


ACCEPTANCE_ROWS = (
    [f"coatnet/CoAtNet-{i}" for i in range(4)]
    + [f"levit/LeViT-{s}" for s in ("128S", "128", "192", "256", "384")]
    + ["cvt/CvT-13", "cvt/CvT-21", "cvt/CvT-W24", "cvt/CvT-W24@384-in22k",
       "coatnet/CoAtNet-4@384-in21k", "coatnet/CoAtNet-4@512-in21k"]
    + [f"earlyconv/ViT_{k}-{s}GF" for k in "PC" for s in (1, 4, 18, 36)]
)


def test_every_paper_row_within_tolerance(verified):
    by_id = {r["id"]: r for r in verified["rows"]}
    for row_id in ACCEPTANCE_ROWS:
        r = by_id[row_id]
        assert abs(r["params_rel"]) <= verify.PARAMS_TOL, (row_id, r["params_m"])
        assert r["gmacs_rel"] is not None and abs(r["gmacs_rel"]) <= verify.GMACS_TOL, \
            (row_id, r["gmacs"])
    assert verify.failures(verified) == []


def test_exact_counts_match_the_official_code():
    # pycls's own counts for EarlyConv (../shared/papers/NOTES.md), to the parameter.
    assert complexity.count("vit_c_18gf").params == 81_573_160
    assert complexity.count("vit_p_18gf").params == 86_567_656


def test_timm_variant_is_the_strided_dconv_one(verified):
    v = {(r["model"], r["id"]): r for r in verified["timm_variants"]}
    timm0 = v[("coatnet_0_224", "coatnet/CoAtNet-0")]
    assert timm0["verdict"] == "OUT OF TOLERANCE"  # +0.4 GFLOPs over Table 4...
    assert v[("coatnet_0_224", "coatnet/CoAtNet-0-strided-dconv")]["verdict"] == "ok"  # Table 9


def test_committed_architecture_report_is_current(verified):
    committed = json.loads((ROOT / "reports/architecture.json").read_text())
    fresh = json.loads(json.dumps(verified))
    assert committed == fresh, "run `repro verify` and commit reports/architecture.*"
    assert (ROOT / "reports/architecture.md").read_text() == render(committed)


def test_verify_cli_one_row(capsys, tmp_path):
    out_md = tmp_path / "arch.md"
    assert main(["verify", "--paper", "earlyconv", "--row", "ViT_C-18GF", "--out",
                 str(out_md)]) == 0
    out = capsys.readouterr().out
    assert "earlyconv/ViT_C-18GF" in out and "81.573" in out
    assert out_md.exists() and out_md.with_suffix(".json").exists()
    assert "Regenerate with" in out_md.read_text()


def test_verify_cli_unknown_row_is_one_line(capsys):
    assert main(["verify", "--paper", "earlyconv", "--row", "ViT_C-18G"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ViT_C-18G" in err
