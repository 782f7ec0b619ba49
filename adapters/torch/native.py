"""The optional one-pass CPU kernels (``cpu_kernels.c``): built in the background on
first use with the system C compiler, verified, cached, and loaded with :mod:`ctypes`.

A sampled step's cost on CPU is memory traffic. torch takes one kernel per statistic,
so the gradient statistics read each tensor about five times; ``cpu_kernels.c`` reads
it once. On this project's machine (2-core AMD EPYC VM, one thread) the statistics of
a 12x512 MLP's gradients took 0.75-1.1 ms this way against 3.4 ms with torch ops,
and twelve 128x512 ReLU outputs 0.18 ms against 0.70 ms (docs/benchmarks.md).

Nothing here is required: without a C compiler, with ``GRADWATCH_NATIVE=0``, while the
kernels are being built, or if the build fails, :func:`cpu_kernels` returns ``None``
and the adapter uses torch ops, with the same results. It never blocks: the first
call starts the build in a daemon thread (a first build took ~0.5 s here; a wedged
compiler is killed after :data:`.native_build._BUILD_TIMEOUT_S`) and the kernels are used from the
first reduction after they are ready.

How the library is built, cached under ``$GRADWATCH_CACHE_DIR`` and verified before it
is loaded is :mod:`.native_build`'s job; this module owns the typed calls and the one
background build of the process.

Example:
    >>> import torch
    >>> kernels = wait_for_kernels()  # None where they cannot be built
    >>> kernels.grad_stats([torch.tensor([3.0, -4.0, 0.0])])[:, 0].tolist()
    [5.0, 4.0, 7.0, 2.0, 0.0]
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Sequence
from operator import attrgetter, methodcaller

import numpy as np
import torch

# Set to 0 to keep gradwatch from compiling anything (the torch ops are used instead).
NATIVE_ENV = "GRADWATCH_NATIVE"
CACHE_ENV = "GRADWATCH_CACHE_DIR"

_c_int64, _c_void_p, _c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def eligible(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` in place: a plain (not a subclass such as a
    DTensor, whose data pointer is not its data), dense, contiguous float32 CPU tensor.
    Anything else takes the torch ops."""
    # is_cpu and layout, not device.type: this runs per tensor per sampled step (~1 us).
    return (
        type(t) in _PLAIN
        and t.is_cpu
        and t.dtype == torch.float32
        and t.layout == torch.strided
        and t.is_contiguous()
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)
_DTYPE, _LAYOUT, _IS_CPU = attrgetter("dtype"), attrgetter("layout"), attrgetter("is_cpu")
_IS_CONTIGUOUS = methodcaller("is_contiguous")


def all_eligible(tensors: Sequence[torch.Tensor]) -> bool:
    """:func:`eligible` of every tensor, as C-level ``map`` passes over the list: a model
    of 5,000 tensors pays ~1 ms here instead of ~3 ms of one Python call per tensor."""
    return bool(
        tensors
        and _PLAIN_SET.issuperset(map(type, tensors))
        and all(map(_IS_CPU, tensors))
        and set(map(_DTYPE, tensors)) == {torch.float32}
        and set(map(_LAYOUT, tensors)) == {torch.strided}
        and all(map(_IS_CONTIGUOUS, tensors))
    )


class CpuKernels:
    """Typed wrappers of the compiled kernels. Every input must pass :func:`eligible`;
    results are new float32 CPU tensors, as the torch path returns."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library  # kept alive as long as its functions are
        self._grad_stats = library.gw_grad_stats_f32
        self._sum_squares = library.gw_sum_squares_f32
        for fn in (self._grad_stats, self._sum_squares):
            fn.argtypes = [_c_int64, _c_void_p, _c_void_p, _c_void_p]
            fn.restype = None
        self._per_unit = library.gw_active_per_unit_f32
        self._per_unit.argtypes = [_c_void_p, _c_int64, _c_int64, _c_int64, _c_void_p]
        self._per_unit.restype = ctypes.c_int
        self._active = library.gw_count_active_f32
        self._active.argtypes = [_c_void_p, _c_int64]
        self._active.restype = ctypes.c_double
        self._tails = library.gw_count_in_tails_f32
        self._tails.argtypes = [_c_void_p, _c_int64, _c_float, _c_float, ctypes.c_int]
        self._tails.restype = ctypes.c_double
        self._nonfinite = library.gw_count_nonfinite_f32
        self._nonfinite.argtypes = [_c_void_p, _c_int64]
        self._nonfinite.restype = ctypes.c_double

    def grad_stats(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(5, n)`` float32: L2 norm, max |g|, sum |g|, non-zero and non-finite
        entries of each tensor, in one read of each (a second one only for tensors whose
        float32 squares would overflow or underflow)."""
        out = torch.empty(5, len(tensors))
        ptrs, numels = _addresses(tensors)
        self._grad_stats(len(tensors), ptrs.ctypes.data, numels.ctypes.data, out.data_ptr())
        return out

    def sum_squares(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(n,)`` float64: the sum of squares of each tensor."""
        out = torch.empty(len(tensors), dtype=torch.float64)
        ptrs, numels = _addresses(tensors)
        self._sum_squares(len(tensors), ptrs.ctypes.data, numels.ctypes.data, out.data_ptr())
        return out

    def active_per_unit(self, y: torch.Tensor, unit_axis: int) -> torch.Tensor:
        """Per unit along ``unit_axis``, the count of entries not ``<= 0`` (NaN is
        active, as in the host reference)."""
        shape = y.shape
        if len(shape) <= 1:
            outer, units, inner = 1, y.numel(), 1
        else:
            axis = unit_axis % len(shape)
            units = shape[axis]
            outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        counts = torch.empty(units)
        if self._per_unit(y.data_ptr(), outer, units, inner, counts.data_ptr()) != 0:
            raise MemoryError("gradwatch: no memory for the per-unit activation counts")
        return counts

    def count_active(self, y: torch.Tensor) -> torch.Tensor:
        """The count of entries of ``y`` not ``<= 0``, as a 0-d tensor."""
        return torch.tensor(self._active(y.data_ptr(), y.numel()), dtype=torch.float32)

    def count_in_tails(self, y: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
        """Entries with ``y <= lo`` or ``y >= hi`` for a tail symmetric about its centre,
        or ``y >= hi`` when ``lo`` is ``-inf`` (NaN is in no tail), as a 0-d tensor."""
        lo, hi = bounds
        if math.isinf(lo):
            count = self._tails(y.data_ptr(), y.numel(), 0.0, hi, 1)
        else:
            centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
            count = self._tails(y.data_ptr(), y.numel(), centre, half, 0)
        return torch.tensor(count, dtype=torch.float32)

    def count_nonfinite(self, y: torch.Tensor) -> torch.Tensor:
        """The count of NaN/Inf entries of ``y``, as a 0-d tensor."""
        return torch.tensor(self._nonfinite(y.data_ptr(), y.numel()), dtype=torch.float32)


def _addresses(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The data addresses and entry counts of ``tensors``, as arrays that live as long
    as the caller holds them (ctypes only sees their addresses)."""
    # List comprehensions: half the cost of np.fromiter over a generator.
    ptrs = np.array([t.data_ptr() for t in tensors], dtype=np.uintp)
    numels = np.array([t.numel() for t in tensors], dtype=np.int64)
    return ptrs, numels


class _KernelBuild:
    """The process's one build of the kernels, run in a daemon thread on first use.

    ``kernels`` is set once they are loaded and probed; ``failure`` says why they are
    not, once the build has ended without them."""

    def __init__(self) -> None:
        self.kernels: CpuKernels | None = None
        self.failure: str | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Start the build unless it has started (or is switched off)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        if os.environ.get(NATIVE_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
            self.failure = f"{NATIVE_ENV}=0"
            self.done.set()
            return
        threading.Thread(target=self._run, name="gradwatch-cpu-kernels", daemon=True).start()

    def _run(self) -> None:
        try:
            # Imported here: the build module imports this one (CpuKernels) at its top.
            from gradwatch.adapters.torch.native_build import load_or_build

            self.kernels = load_or_build()
        except Exception as exc:  # an optional speed-up must never fail the caller
            text = str(exc).strip()
            self.failure = text.splitlines()[0] if text else type(exc).__name__
        finally:
            self.done.set()


_BUILD = _KernelBuild()


def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or ``None`` while they are being built, when they are
    switched off (``GRADWATCH_NATIVE=0``) or when they cannot be built here
    (:func:`build_failure` says why). Never blocks: the first call starts the build."""
    kernels = _BUILD.kernels
    if kernels is None and not _BUILD.done.is_set():
        _BUILD.start()
    return kernels


def wait_for_kernels(timeout: float | None = None) -> CpuKernels | None:
    """:func:`cpu_kernels` once the build has ended (or ``timeout`` seconds passed)."""
    build = _BUILD
    build.start()
    build.done.wait(timeout)
    return build.kernels


def build_status() -> str:
    """``"ready"``, ``"building"`` or ``"unavailable"`` (:func:`build_failure` says why);
    starts the build."""
    cpu_kernels()
    if _BUILD.kernels is not None:
        return "ready"
    return "unavailable" if _BUILD.done.is_set() else "building"


def build_failure() -> str | None:
    """Why :func:`cpu_kernels` returns ``None`` for good (``None`` while it may still
    return the kernels, and once it does)."""
    return _BUILD.failure if _BUILD.done.is_set() else None


def forget_build() -> None:
    """Forget the build, so the next :func:`cpu_kernels` builds or loads again (tests;
    a build still running finishes into the forgotten state)."""
    global _BUILD
    _BUILD = _KernelBuild()


__all__ = [
    "CACHE_ENV",
    "NATIVE_ENV",
    "CpuKernels",
    "all_eligible",
    "build_failure",
    "build_status",
    "cpu_kernels",
    "eligible",
    "forget_build",
    "wait_for_kernels",
]
