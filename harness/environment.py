"""The environment variables the harness sets for the libraries it uses, in one place, and the allocator
setting of its training loop.

`configure()` runs at CLI start, before any stage module (and so SparseML, DeepSparse, lm-eval or
tokenizers) is imported, and in the test session. Child processes inherit the variables. A variable
the user has set already is left as it is.
"""
from __future__ import annotations

import ctypes
import os

DEFAULTS = {
    # Read when SparseML / DeepSparse are first imported: otherwise each starts a thread posting usage
    # analytics to Google.
    "NM_DISABLE_ANALYTICS": "1",
    # SparseML finds each magnitude threshold with a full torch.sort unless this is set, then with
    # torch.kthvalue: the same value, ~6x faster on CPU (0.28 vs 1.6 s per 10M weights), no sorted copy.
    "MEMORY_BOUNDED": "True",
    # lm-eval's bootstrap_stderr otherwise forks a multiprocessing Pool; forking a process that already
    # runs torch/OpenMP and tqdm threads can leave a lock held in the child forever (a sweep hung so).
    "DISABLE_MULTIPROC": "1",
    # The tokenizers' Rust thread pool does not survive a fork: with it on, the child processes the
    # stages start get a warning each, and a forked child can deadlock.
    "TOKENIZERS_PARALLELISM": "false",
    # NNCF (the bench's OpenVINO INT8 engine) sends usage telemetry unless this is set (its only effect).
    "NNCF_CI": "1",
}
# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def configure() -> None:
    """Set every variable of DEFAULTS that is not set yet."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def keep_freed_memory() -> None:
    """Have glibc serve large tensors from its heap and keep what is freed, for a training loop.

    By default every allocation above 32 MB (logits and their gradients: 4 x 512 x 49k floats on SmolLM2) is
    mapped fresh from the kernel and unmapped when freed, and the kernel zeroes each new page again. Measured
    on SmolLM2's bf16 distillation: 370-380 against about 330 tokens/s (system time 18-23 against 59 s in
    100 s of training), for a peak of 12.3-12.9 GB against 9.2 (the heap keeps its holes). Does nothing
    where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_MAX, 0)  # no allocation gets its own mapping
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never return the heap's free top to the kernel
