"""Where the project keeps things: runs, caches, benchmark data. Each is overridable by an environment variable."""
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _dir(env_var: str, default: Path) -> Path:
    return Path(os.environ.get(env_var, default)).expanduser().resolve()


def runs_dir() -> Path:
    """Root of all run directories (`runs/<model>/<recipe>/<level>/`)."""
    return _dir("HARNESS_RUNS", PROJECT_ROOT / "runs")


def cache_dir() -> Path:
    """Models the project builds or converts itself (tiny models, GGUF conversions)."""
    return _dir("HARNESS_CACHE", PROJECT_ROOT / ".cache" / "harness")


def data_dir() -> Path:
    """Benchmark files, read in place from `../shared/data` beside the project root."""
    return _dir("HARNESS_DATA", PROJECT_ROOT.parent / "shared" / "data")


def reports_dir() -> Path:
    return _dir("HARNESS_REPORTS", PROJECT_ROOT / "reports")


RECIPES_DIR = PROJECT_ROOT / "recipes"
EVALS_DIR = PROJECT_ROOT / "evals"
