"""Lazy Triton: triton is imported, and a kernel jitted, when a Triton kernel is first launched.

Triton chooses between the GPU compiler and the CPU interpreter (`TRITON_INTERPRET=1`) when it is imported
(its own `tl.*` helpers are jitted then) and when a kernel is decorated. Importing it with amd_fast would fix
that choice before a test can ask for the interpreter, and would cost every CPU process the import. So the
kernel modules hold plain functions, and `lazy_jit` imports triton, puts `tl` / `triton` into the kernel's
module globals and decorates it on first use. The autotune list is given only when a GPU is present:
`@triton.autotune` with several configs fails without a GPU driver, and the interpreter ignores it anyway.
"""

from __future__ import annotations

import functools

import torch


def lazy_jit(fn, gpu_configs=None, key=()):
    """Return a getter for `fn` jitted (and autotuned over gpu_configs() on a GPU)."""

    @functools.cache
    def get_kernel():
        import triton
        import triton.language as tl
        from amd_fast.kernels.backend import triton_interpreting

        fn.__globals__["tl"], fn.__globals__["triton"] = tl, triton
        k = triton.jit(fn)
        if gpu_configs is not None and torch.cuda.is_available() and not triton_interpreting():
            k = triton.autotune(configs=gpu_configs(), key=list(key))(k)
        return k

    return get_kernel


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
