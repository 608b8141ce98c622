"""Process-level launch settings: the malloc implementation.

On CPU the allocator matters: a training step frees and re-allocates hundreds of MB of activations, and
glibc's malloc returns large blocks to the OS (mmap / munmap, page faults on every reuse). jemalloc and
tcmalloc keep them. `benchmarks/step.py --allocators default jemalloc tcmalloc` measures the three side
by side; `train.allocator=auto` uses the one that measured best on this project's machines: tcmalloc.

The allocator must be loaded before the process starts, so `ensure_allocator` re-executes the same command
line once with LD_PRELOAD set (as Intel's PyTorch launcher does); nothing else changes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Debian / Ubuntu package paths: libjemalloc2, libtcmalloc-minimal4
ALLOCATORS = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}
# Measured on this project's 2-core CPU (benchmarks/results/step.csv, paper video step, two interleaved rounds):
# tcmalloc 2.68-2.95 s/step, glibc 2.84-3.18, jemalloc 3.16-3.51. jemalloc is slower than glibc here, so auto
# never picks it; with no tcmalloc installed, auto keeps glibc.
AUTO_PREFERENCE = ("tcmalloc",)
_REEXEC_FLAG = "AMD_FAST_ALLOCATOR_SET"


def allocator_in_use() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    for name, path in ALLOCATORS.items():
        if Path(path).name in preload or name in preload:
            return name
    return "glibc"


def ensure_allocator(choice: str) -> None:
    """Re-exec under the chosen allocator if it is not loaded yet. `default` leaves the process alone."""
    if choice == "default" or os.environ.get(_REEXEC_FLAG) or sys.platform != "linux":
        log.info("malloc: %s (train.allocator=%s)", allocator_in_use(), choice)
        return
    names = AUTO_PREFERENCE if choice == "auto" else (choice,)
    for name in names:
        path = ALLOCATORS[name]
        if allocator_in_use() == name:
            return
        if Path(path).exists():
            env = {**os.environ, _REEXEC_FLAG: name}
            env["LD_PRELOAD"] = f"{path} {env['LD_PRELOAD']}".strip() if env.get("LD_PRELOAD") else path
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        if choice != "auto":
            log.warning("train.allocator=%s: %s not found (apt-get install %s); using glibc malloc", name, path,
                        "libjemalloc2" if name == "jemalloc" else "libtcmalloc-minimal4")  # fmt: skip
    if choice == "auto":
        log.info("train.allocator=auto: no jemalloc / tcmalloc found, using glibc malloc")
