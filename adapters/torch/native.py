"""The optional one-pass CPU kernels (``cpu_kernels.c``): built on first use with the
system C compiler, cached, and loaded with :mod:`ctypes`.

A sampled step's cost on CPU is memory traffic. torch takes one kernel per statistic,
so the gradient statistics read each tensor about five times; ``cpu_kernels.c`` reads
it once. On this project's machine (2-core AMD EPYC VM, one thread) the statistics of
a 12x512 MLP's gradients took 0.75-1.1 ms this way against 3.4 ms with torch ops,
and twelve 128x512 ReLU outputs 0.18 ms against 0.70 ms (docs/benchmarks.md).

Nothing here is required: without a C compiler, with ``GRADWATCH_NATIVE=0``, or if the
build fails, :func:`cpu_kernels` returns ``None`` and the adapter uses torch ops, with
the same results. The library is compiled with ``-O3 -march=native`` and cached under
``$GRADWATCH_CACHE_DIR`` (default ``~/.cache/gradwatch``) by a key made of the source,
the compiler and the CPU's model and feature flags, so a home directory shared by
different machines never loads code built for another CPU.

Example:
    >>> import torch
    >>> kernels = cpu_kernels()  # None where it cannot be built
    >>> kernels.grad_stats([torch.tensor([3.0, -4.0, 0.0])])[:, 0].tolist()
    [25.0, 4.0, 7.0, 2.0, 0.0]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Set to 0 to keep gradwatch from compiling anything (the torch ops are used instead).
NATIVE_ENV = "GRADWATCH_NATIVE"
CACHE_ENV = "GRADWATCH_CACHE_DIR"
# A first build took ~0.5 s here; a wedged compiler must not hold up training.
_BUILD_TIMEOUT_S = 60.0

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


class CpuKernels:
    """Typed wrappers of the compiled kernels. Every input must pass :func:`eligible`;
    results are new float32 CPU tensors, as the torch path returns."""

    def __init__(self, library: ctypes.CDLL) -> None:
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

    def grad_stats(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(5, n)``: sum of squares, max |g|, sum |g|, non-zero and non-finite
        entries of each tensor, in one read of each."""
        out = torch.empty(5, len(tensors))
        ptrs, numels = _addresses(tensors)
        self._grad_stats(len(tensors), ptrs.ctypes.data, numels.ctypes.data, out.data_ptr())
        return out

    def sum_squares(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(n,)``: the sum of squares of each tensor."""
        out = torch.empty(len(tensors))
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


def _addresses(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The data addresses and entry counts of ``tensors``, as arrays that live as long
    as the caller holds them (ctypes only sees their addresses)."""
    ptrs = np.fromiter((t.data_ptr() for t in tensors), dtype=np.uintp, count=len(tensors))
    numels = np.fromiter((t.numel() for t in tensors), dtype=np.int64, count=len(tensors))
    return ptrs, numels


@functools.lru_cache(maxsize=1)
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or ``None`` when they are switched off (``GRADWATCH_NATIVE=0``)
    or cannot be built here; :func:`build_failure` then says why."""
    global _failure
    if os.environ.get(NATIVE_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        _failure = f"{NATIVE_ENV}=0"
        return None
    try:
        return CpuKernels(ctypes.CDLL(str(_build())))
    except Exception as exc:  # an optional speed-up must never fail the caller
        _failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None


_failure: str | None = None


def build_failure() -> str | None:
    """Why :func:`cpu_kernels` returned ``None`` (``None`` if it has not, or did not)."""
    return _failure


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            found = shutil.which(candidate.split()[0])
            if found:
                return found
    raise RuntimeError("no C compiler found (set CC)")


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags: ``-march=native`` code is only valid on a CPU
    with the same features."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keys = ("model name", "flags", "Features", "CPU part", "CPU implementer")
        return "\n".join(sorted({line for line in lines if line.startswith(keys)}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gradwatch"
    )
    return Path(root)


def _build() -> Path:
    """The cached shared library, compiled if absent (atomically: concurrent processes,
    such as DDP ranks, each write their own file and rename it into place)."""
    source = SOURCE.read_bytes()
    cc = _compiler()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), _cpu_fingerprint().encode()]))
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    target = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in (["-O3", "-march=native"], ["-O3"]):
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
        os.close(fd)
        command = [cc, *flags, "-std=c99", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        errors.append(done.stderr.strip() or f"{cc} exited with {done.returncode}")
    raise RuntimeError(f"C compiler failed: {errors[-1]}")


__all__ = ["CACHE_ENV", "NATIVE_ENV", "CpuKernels", "build_failure", "cpu_kernels", "eligible"]
