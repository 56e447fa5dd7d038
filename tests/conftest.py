"""Shared fixtures: every test session writes runs into a temporary directory, never into runs/."""
import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def isolated_runs(tmp_path_factory):
    os.environ["HARNESS_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    os.environ["HARNESS_REPORTS"] = str(tmp_path_factory.mktemp("reports"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
