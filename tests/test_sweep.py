"""Sweep: a grid of runs that resumes, redoes exactly what is missing, and survives a failing level."""
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import sweep
from harness.errors import HarnessError
from harness.paths import runs_dir
from harness.rundir import RunDir, read_json

MODEL = "tiny-gpt2"
RECIPES = ["sparseml/oneshot-magnitude", "inc/oneshot-magnitude"]
LEVELS = [0, 50]
STAGES = ["prune", "analyze"]


def finished_times() -> dict:
    """(recipe, level, stage) -> the time the manifest says that stage finished."""
    times = {}
    for recipe in RECIPES:
        for level in LEVELS:
            stages = RunDir(MODEL, recipe, level).manifest()["stages"]
            times.update({(recipe, level, stage): stages[stage]["finished"] + str(stages[stage]["wall_time_s"])
                          for stage in STAGES})
    return times


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_RUNS", str(tmp_path_factory.mktemp("sweep-runs")))
        summary = sweep.sweep([MODEL], RECIPES, LEVELS, STAGES)
        yield summary


def test_sweep_runs_every_stage_of_the_grid(swept):
    assert set(swept[MODEL]) == {f"{r}/{lv}" for r in RECIPES for lv in LEVELS}
    assert all(s["status"] == "done" for stages in swept[MODEL].values() for s in stages.values())
    for recipe in RECIPES:
        measured = read_json(RunDir(MODEL, recipe, 50).path / "sparsity.json")["achieved_percent"]
        assert abs(measured - 50) <= 1
        assert (RunDir(MODEL, recipe, 50).path / "analysis" / "structure.json").exists()
    ledger = read_json(runs_dir() / MODEL / "sweep.json")
    assert ledger["runs"]["inc/oneshot-magnitude/50"]["analyze"]["status"] == "done"


def test_rerun_does_no_work_and_a_deleted_output_reruns_exactly_its_stage(swept):
    before = finished_times()
    sweep.sweep([MODEL], RECIPES, LEVELS, STAGES)
    assert finished_times() == before

    (RunDir(MODEL, RECIPES[1], 50).path / "analysis" / "structure.json").unlink()
    sweep.sweep([MODEL], RECIPES, LEVELS, STAGES)
    after = finished_times()
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {(RECIPES[1], 50, "analyze")}


def test_a_failing_level_is_recorded_and_the_others_complete(swept, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_RUNS", str(tmp_path))
    from harness.backends import sparseml

    real_prune = sparseml.prune

    def fail_at_50(job):
        if job.sparsity == 0.5:
            raise RuntimeError("planted failure")
        return real_prune(job)

    monkeypatch.setattr(sparseml, "prune", fail_at_50)
    summary = sweep.sweep([MODEL], RECIPES[:1], [0, 50], STAGES)[MODEL]
    assert summary[f"{RECIPES[0]}/50"]["prune"]["status"] == "failed"
    assert "planted failure" in summary[f"{RECIPES[0]}/50"]["prune"]["error"]
    assert summary[f"{RECIPES[0]}/50"]["analyze"]["status"] == "skipped"
    assert all(s["status"] == "done" for s in summary[f"{RECIPES[0]}/0"].values())
    assert not RunDir(MODEL, RECIPES[0], 50).path.exists()  # nothing half-written
    # a later sweep of other levels reports its own grid, not the failure still in the ledger
    assert list(sweep.sweep([MODEL], RECIPES[:1], [0], STAGES)[MODEL]) == [f"{RECIPES[0]}/0"]


def test_bad_sweep_arguments_are_one_line_errors():
    assert sweep.parse_levels(["0,50", "90", 99.5]) == [0, 50, 90, 99.5]
    with pytest.raises(HarnessError, match="LEVEL must be a number in \\[0, 100\\), got 'x'"):
        sweep.parse_levels(["50,x"])
    with pytest.raises(HarnessError, match="unknown stage 'train'"):
        sweep.parse_stages("prune,train")
    with pytest.raises(HarnessError, match="STAGE:ARGS"):
        sweep.parse_stage_args(["--iterations 2"])
    assert sweep.parse_stage_args(["bench:--iterations 2 --batch-sizes 1"]) == {
        "bench": ["--iterations", "2", "--batch-sizes", "1"]}
    with pytest.raises(HarnessError, match="unknown executor 'slurm'"):
        sweep.sweep([MODEL], RECIPES[:1], [50], STAGES, executor="slurm")


def test_discarding_artifacts_keeps_results_and_resume(monkeypatch, tmp_path):
    """A full-size sweep's disk mode: each finished run loses its weights, ONNX and compressed copy, the
    dense timings come from level 0's bench.json, and a rerun still does no work."""
    monkeypatch.setenv("HARNESS_RUNS", str(tmp_path))
    from harness import load

    stages = ["prune", "analyze", "export", "bench"]
    bench_args = {"bench": ["--dense-timings", "level0", "--batch-sizes", "1", "--seq-len", "8", "--threads", "1",
                            "--iterations", "1", "--min-time", "0", "--engines", "onnxruntime,pytorch",
                            "--gzip-level", "1"]}
    summary = sweep.sweep([MODEL], RECIPES[:1], [0, 50], stages, stage_args=bench_args, discard_artifacts=True)
    assert all(s["status"] == "done" for st in summary[MODEL].values() for s in st.values())

    dense, sparse = (RunDir(MODEL, RECIPES[0], level) for level in (0, 50))
    sparse_bench, dense_bench = (read_json(r.path / "bench.json") for r in (sparse, dense))
    assert sparse_bench["dense_results"] == dense_bench["results"]
    assert sparse_bench["settings"]["dense_timings"] == "level0"
    for run in (dense, sparse):
        assert not list(run.model_dir.glob("*.safetensors"))
        assert not (run.path / "onnx").exists() and not (run.path / "compressed").exists()
        assert (run.path / "analysis" / "structure.json").exists()
        assert run.manifest()["discarded"]["bytes"] > 0
    with pytest.raises(HarnessError, match="Recreate them with: python -m harness prune"):
        load.load_model(str(sparse.path))

    stamps = {(r.level, s): r.stage_record(s)["finished"] for r in (dense, sparse) for s in stages}
    rerun = sweep.sweep([MODEL], RECIPES[:1], [0, 50], stages, stage_args=bench_args, discard_artifacts=True)
    assert all(s["status"] == "done" for st in rerun[MODEL].values() for s in st.values()), rerun
    assert {(r.level, s): r.stage_record(s)["finished"] for r in (dense, sparse) for s in stages} == stamps


def test_isolated_stages_run_in_their_own_processes_and_report_failures(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_RUNS", str(tmp_path))
    summary = sweep.sweep([MODEL], RECIPES[:1] + ["sparseml/no-such-recipe"], [50], ["prune", "analyze"],
                          isolate=True)[MODEL]
    assert {s["status"] for s in summary[f"{RECIPES[0]}/50"].values()} == {"done"}
    command = RunDir(MODEL, RECIPES[0], 50).stage_record("prune")["command"]
    assert "harness/__main__.py" in command  # run by `python -m harness`, not in the test process
    failed = summary["sparseml/no-such-recipe/50"]["prune"]
    assert failed["status"] == "failed" and "no-such-recipe" in failed["error"] and "\n" not in failed["error"]


def test_a_variant_s_parameters_in_any_order_are_one_run_in_the_ledger(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_RUNS", str(tmp_path))
    summary = sweep.sweep([MODEL], ["sparseml/oneshot-wanda@seq_len=32,samples=4"], [50], ["prune"])[MODEL]
    assert list(summary) == ["sparseml/oneshot-wanda@samples=4,seq_len=32/50"] and summary[
        "sparseml/oneshot-wanda@samples=4,seq_len=32/50"]["prune"]["status"] == "done"
    assert list(read_json(runs_dir() / MODEL / "sweep.json")["runs"]) == list(summary)


INTERRUPTED_SWEEP = """
import sys
from harness import sweep
from harness.cli import interrupt_on_sigterm
interrupt_on_sigterm()
sys.executable = sys.argv[1]  # the stage "process": a script that records its PID and sleeps
sweep.run_stage_process(["bench"])
"""


def test_a_killed_isolated_sweep_stops_its_stage_process(tmp_path):
    pid_file = tmp_path / "stage.pid"
    stage = tmp_path / "stage.sh"
    stage.write_text(f"#!/bin/sh\necho $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}\nexec sleep 60\n")
    stage.chmod(0o755)
    parent = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SWEEP, str(stage)], cwd=Path(__file__).parents[1])
    deadline = time.time() + 30
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    stage_pid = int(pid_file.read_text())
    parent.terminate()
    assert parent.wait(timeout=30) != 0
    assert not psutil.pid_exists(stage_pid) or psutil.Process(stage_pid).status() == psutil.STATUS_ZOMBIE
