"""Run Python code in a child process that may abort or run the machine out of memory, and say why it failed.

DeepSparse's compiler aborts the whole process on some graphs (SmolLM2's Llama export) and can need more
memory than the machine has (DeBERTa-v2-xxlarge at batch 16): in a child, either ends only the child.
The bench times DeepSparse in one, the evaluators try each graph's first compile in one.
"""
from __future__ import annotations

import signal
import subprocess
import sys

import psutil

MIN_AVAILABLE_BYTES = 2**29  # below this the machine is thrashing, not computing
MEMORY_POLL_SECONDS = 1.0


def child_failure(code: str, *args: str) -> str | None:
    """Run Python `code` in a child process (`args` as sys.argv[1:]): why it failed, or None if it exited
    cleanly. The reason names what the child last printed to stdout ("while ...").

    The child is stopped when the machine's available memory falls below MIN_AVAILABLE_BYTES: without
    swap, the kernel first evicts the file pages every process runs from and the machine crawls for
    many minutes before its OOM killer acts (DeepSparse compiling DeBERTa-v2-xxlarge at batch 16).
    """
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    low_memory = None
    while True:
        try:
            stdout, stderr = child.communicate(timeout=MEMORY_POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            available = psutil.virtual_memory().available
            if available < MIN_AVAILABLE_BYTES and low_memory is None:
                low_memory = available
                child.kill()
    if child.returncode == 0:
        return None
    doing = stdout.strip().splitlines()[-1:]
    where = f" while {doing[0]}" if doing else ""
    if low_memory is not None:
        return (f"stopped{where}: the machine was down to {low_memory / 2**30:.1f} GiB of available memory "
                f"(it needs more memory than this machine has)")
    if child.returncode == -signal.SIGKILL:
        return f"killed{where} (out of memory?)"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith(("Assertion", "RuntimeError", "ValueError"))),
                  lines[-1] if lines else "")
    return f"exit code {child.returncode}{where}: {reason[:160]}"
