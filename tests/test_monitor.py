"""The stall watch every stage runs under: it speaks up when a stage stops using CPU time, never while it works."""
import subprocess
import sys
import time

import pytest

from harness.errors import HarnessError
from harness.layout import MANIFEST
from harness.rundir import read_json, stage_run, staging_dir

STALL_S = 0.5
BODY_S = 3.0  # six stall periods: long enough for a warning, short enough for the suite
BUSY_LOOP = f"import time\nend = time.monotonic() + {BODY_S}\nwhile time.monotonic() < end: pass"


def sleep():
    time.sleep(BODY_S)


def spin():
    exec(BUSY_LOOP)


def wait_for_idle_child():
    """The hang of issue 16: the stage waits on a child process that never does anything."""
    subprocess.run([sys.executable, "-c", f"import time; time.sleep({BODY_S})"], check=True)


def wait_for_busy_child():
    subprocess.run([sys.executable, "-c", BUSY_LOOP], check=True)


def stall_warnings(capsys, tmp_path, body) -> list[str]:
    """Run `body` as a stage of run directory `tmp_path/run` (built in staging, like prune); its stall warnings."""
    with staging_dir(tmp_path / "run") as tmp:
        with stage_run(tmp / MANIFEST, "quiet", "x"):
            body()
        assert read_json(tmp / MANIFEST)["stages"]["quiet"]["status"] == "done"
    return [line for line in capsys.readouterr().err.splitlines() if "no progress" in line]


@pytest.mark.parametrize("body,stalls", [(sleep, True), (wait_for_idle_child, True), (spin, False),
                                         (wait_for_busy_child, False)])
def test_a_stage_that_uses_no_cpu_time_says_so_and_a_busy_one_does_not(capsys, monkeypatch, tmp_path, body, stalls):
    monkeypatch.setenv("HARNESS_STALL_MINUTES", str(STALL_S / 60))
    warnings = stall_warnings(capsys, tmp_path, body)
    if not stalls:
        assert warnings == []
        return
    assert 1 <= len(warnings) <= BODY_S / STALL_S  # repeated at most once per stall period
    for line in warnings:
        assert line.startswith(f"quiet stage of {tmp_path / 'run'}: no progress for ")
        assert "may be deadlocked" in line and "Ctrl-C" in line


def test_the_stall_warning_can_be_turned_off(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_STALL_MINUTES", "0")
    assert stall_warnings(capsys, tmp_path, lambda: time.sleep(STALL_S)) == []


@pytest.mark.parametrize("value", ["ten", "-1", "nan"])
def test_a_bad_stall_threshold_fails_before_the_stage_runs(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HARNESS_STALL_MINUTES", value)
    ran = []
    with pytest.raises(HarnessError, match=f"HARNESS_STALL_MINUTES must be a number of minutes.*got '{value}'"):
        with stage_run(tmp_path / MANIFEST, "quiet", "x"):
            ran.append(True)
    assert ran == [] and not (tmp_path / MANIFEST).exists()
