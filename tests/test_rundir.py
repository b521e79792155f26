"""The run directory has one owner (repro.rundir): run ids, the typed results record, discovery,
the completed-run guard; and the launch size a Slurm job asks for is the recipe's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repro import rundir
from repro.cli import main
from repro.launch.slurm import ClusterProfile, SubmissionError, sbatch_parameters
from repro.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-x", "a b", "x" * 129])
def test_a_run_id_is_one_safe_path_component(bad):
    with pytest.raises(rundir.RunError, match="run id"):
        rundir.check_run_id(bad)


def test_the_default_run_id_carries_the_seed_and_a_given_one_wins():
    assert rundir.choose_run_id(None, None, 3).endswith("-s3")
    assert rundir.choose_run_id(None, "from-recipe", 3) == "from-recipe"
    assert rundir.choose_run_id("given", "from-recipe", 3) == "given"


def test_results_round_trip_with_the_seed(tmp_path):
    run = rundir.Run.at(str(tmp_path), "quickstart", "r1")
    run.path.mkdir(parents=True)
    record = rundir.Results(run_id="r1", recipe="quickstart", status="complete", seed=2,
                            epochs_done=3, epochs_planned=3, extra={"lr": 0.1},
                            metrics={"final/eval/top1": 91.5})
    run.write_results(record)
    saved = json.loads((run.path / "results.json").read_text())
    assert saved["schema_version"] == rundir.RESULTS_SCHEMA and saved["seed"] == 2
    assert saved["final/eval/top1"] == 91.5 and saved["lr"] == 0.1  # flat, as before
    assert run.results() == record


def test_a_schema_1_run_takes_its_seed_from_the_resolved_recipe(tmp_path):
    run = rundir.Run(tmp_path / "quickstart" / "old")
    run.path.mkdir(parents=True)
    (run.path / "results.json").write_text(json.dumps(
        {"schema_version": 1, "run_id": "old", "recipe": "quickstart", "status": "complete"}))
    (run.path / "recipe.yaml").write_text("# resolved\ntrain: {seed: 7}\n")
    assert run.results().seed == 7


def test_runs_are_found_below_a_folder_but_not_in_code_snapshots(tmp_path):
    for rel in ("a/r1", "a/r2", "b/r1", "a/_code/r1"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "launch.json").write_text("{}")
    found = [r.path.relative_to(tmp_path).as_posix() for r in rundir.find_runs(tmp_path)]
    assert found == ["a/r1", "a/r2", "b/r1"]
    assert [r.path for r in rundir.find_runs([tmp_path / "a/r2"])] == [tmp_path / "a/r2"]


def test_a_completed_run_is_refused_and_an_unfinished_one_is_not(tmp_path):
    run = rundir.Run(tmp_path / "r")
    run.path.mkdir()
    run.write_results(rundir.Results(run_id="r", recipe="q", status="running"))
    run.refuse_if_complete()
    run.write_results(rundir.Results(run_id="r", recipe="q", status="complete"))
    with pytest.raises(rundir.RunExists, match="has completed"):
        run.refuse_if_complete()


def test_a_bad_run_id_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    code = main(["launch", str(ROOT / "recipes/quickstart.yaml"), "--run-id", "../escape",
                 f"train.output_dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "run id '../escape'" in err
    assert not any(tmp_path.iterdir())


def test_a_cluster_job_asks_for_the_recipes_gpus_per_node():
    recipe = load_recipe(ROOT / "recipes/earlyconv_vitb.yaml")  # 2 nodes x 8 GPUs
    p = sbatch_parameters(recipe, ClusterProfile(gpus_per_node=8), None)
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (2, 8, 8)
    small = load_recipe(ROOT / "recipes/earlyconv_vitb.yaml", ["launch.gpus_per_node=4"])
    p = sbatch_parameters(small, ClusterProfile(gpus_per_node=8), None)
    assert (p["tasks_per_node"], p["gpus_per_node"]) == (4, 4)
    with pytest.raises(SubmissionError, match="launch.gpus_per_node: 8 but the cluster"):
        sbatch_parameters(recipe, ClusterProfile(gpus_per_node=4), None)
    cpu = sbatch_parameters(recipe, ClusterProfile(gpus_per_node=0, tasks_per_node=2), 1)
    assert (cpu["nodes"], cpu["tasks_per_node"]) == (1, 2) and "gpus_per_node" not in cpu
