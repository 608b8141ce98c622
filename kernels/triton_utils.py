"""Lazy Triton kernels, autotuned safely on a GPU.

Triton chooses between the GPU compiler and the CPU interpreter (`TRITON_INTERPRET=1`) when it is imported
(its own `tl.*` helpers are jitted then) and when a kernel is decorated. Importing it with amd_fast would fix
that choice before a test can ask for the interpreter, and would cost every CPU process the import. So the
kernel modules hold plain functions, and `LazyKernel` imports triton, puts `tl` / `triton` into the kernel's
module globals and decorates it on first launch.

On a GPU the kernel is wrapped in `triton.autotune`. The autotuner benchmarks every config by launching the
kernel many times **on the live arguments** before the real launch, so a kernel that accumulates into a
buffer (a scatter-add's atomics) or rewrites one of its inputs in place (the fused loss's row pass writes the
gradient over z) would return the sum, or the composition, of all those launches. Each kernel therefore
declares what its launches write: `reset_to_zero` (buffers it accumulates into from zero) and `restore_value`
(buffers it reads and overwrites), which Triton's autotuner zeroes / restores around every benchmark launch
and before the real one. `TUNE_KEY` is the rows bucketed to a power of two (`next_pow2`), so a new batch size
retunes only when it changes the bucket.

No CPU run can see that bug: under the interpreter Triton skips autotuning. `standin_tuner` makes it happen
there too: Triton's own `Autotuner`, over the GPU configs, with a benchmark function that launches each config
a few times on the same arguments (tests/test_kernels.py).
"""

from __future__ import annotations

import contextlib
import random

import torch
from amd_fast.kernels.backend import triton_interpreting

_STANDIN: dict = {}  # {"do_bench": fn} while standin_tuner() is active


class LazyKernel:
    """`fn` jitted on first launch; on a GPU (or under `standin_tuner`) autotuned over `gpu_configs()`.

    kernel[grid](*args, **constexprs): grid is a tuple or a function of the launch's meta-parameters (the tuned
    ones included). `cpu_meta` are the meta-parameters a tuned config would set, given on untuned launches (the
    interpreter: few, large programs). `prune(configs, block_d)` drops configs that do not fit a row width.
    """

    registry: list[LazyKernel] = []

    def __init__(self, fn, gpu_configs=None, key=(), *, reset_to_zero=(), restore_value=(), cpu_meta=None,
                 prune=None):  # fmt: skip
        self.fn, self.gpu_configs, self.key = fn, gpu_configs, list(key)
        self.reset_to_zero, self.restore_value = list(reset_to_zero), list(restore_value)
        self.cpu_meta, self.prune = dict(cpu_meta or {}), prune
        self._built: dict = {}  # mode -> (kernel, meta given at launch)
        LazyKernel.registry.append(self)

    def _mode(self) -> str:
        if self.gpu_configs is None:
            return "plain"
        if triton_interpreting():
            return "standin" if _STANDIN else "plain"
        return "gpu" if torch.cuda.is_available() else "plain"

    def _build(self, mode: str):
        import triton
        import triton.language as tl

        self.fn.__globals__["tl"], self.fn.__globals__["triton"] = tl, triton
        k = triton.jit(self.fn)
        if mode == "plain":
            return k, self.cpu_meta
        prune = None
        if self.prune is not None and mode == "gpu":  # the stand-in tunes over every config: each must be right
            prune = {"early_config_prune": lambda configs, nargs, **kw: self.prune(configs, kw["BLOCK_D"])}
        do_bench = _STANDIN["do_bench"] if mode == "standin" else _quick_bench
        k = triton.autotune(configs=self.gpu_configs(), key=self.key, prune_configs_by=prune,
                            reset_to_zero=self.reset_to_zero or None, restore_value=self.restore_value or None,
                            do_bench=do_bench)(k)  # fmt: skip
        return k, {}

    def __getitem__(self, grid):
        mode = self._mode()
        if mode not in self._built:
            self._built[mode] = self._build(mode)
        k, meta = self._built[mode]
        return lambda *args, **kw: k[grid](*args, **kw, **meta)


def _quick_bench(kernel_call, quantiles):
    """Triton's benchmark with a shorter budget (5 ms warm-up, 20 ms timed; its default 25 / 100 ms would cost
    ~1 s per kernel and shape at the first step, and minutes over the test grid on a GPU)."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


@contextlib.contextmanager
def standin_tuner(launches: int = 3, seed: int = 0):
    """Under the interpreter, tune every Triton launch as a GPU would: Triton's autotuner over the GPU configs,
    each config launched `launches` times on the live arguments (random timings pick the winner), the winner
    then launched for real. Kernels built before are rebuilt inside (the tuned build is cached apart)."""
    rng = random.Random(seed)

    def do_bench(kernel_call, quantiles):
        for _ in range(launches):
            kernel_call()
        t = rng.random()
        return [t, t, t] if quantiles else t

    _STANDIN["do_bench"] = do_bench
    try:
        yield
    finally:
        _STANDIN.clear()
        for k in LazyKernel.registry:
            k._built.pop("standin", None)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
