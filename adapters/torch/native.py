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
compiler is killed after :data:`_BUILD_TIMEOUT_S`) and the kernels are used from the
first reduction after they are ready.

The library is compiled with ``-O3 -march=native`` and cached under
``$GRADWATCH_CACHE_DIR`` (default ``~/.cache/gradwatch``) by a key made of the source,
the compiler and the CPU's model and feature flags, so a home directory shared by
different machines never loads code built for another CPU. What is loaded is
verified first, because loading a truncated library (a disk-full build, an interrupted
copy) kills the process with SIGBUS:

* the library's name holds its sha256 and it is renamed into place whole; a manifest
  ``cpu_kernels-<key>.json`` (size and sha256) is renamed into place after it, so
  concurrent builders (DDP ranks) each publish a complete pair;
* before ``dlopen`` the size, the sha256 and the ELF headers (every segment inside
  the file) are checked; after it, a load probe compares each kernel with torch on a
  tiny tensor. Any mismatch rebuilds the library; temporary files never stay behind.

Example:
    >>> import torch
    >>> kernels = wait_for_kernels()  # None where they cannot be built
    >>> kernels.grad_stats([torch.tensor([3.0, -4.0, 0.0])])[:, 0].tolist()
    [5.0, 4.0, 7.0, 2.0, 0.0]
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Set to 0 to keep gradwatch from compiling anything (the torch ops are used instead).
NATIVE_ENV = "GRADWATCH_NATIVE"
CACHE_ENV = "GRADWATCH_CACHE_DIR"
# A first build took ~0.5 s here; the build runs in the background, so this only bounds
# how long a wedged compiler lingers before it is killed.
_BUILD_TIMEOUT_S = 60.0
# Temporary files older than this were left by a killed process, not by a live build.
_STALE_TEMP_S = 3600.0
# Bumped when the cache layout changes, so old entries are never read.
_CACHE_FORMAT = b"gradwatch-kernels-2"

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


def _addresses(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The data addresses and entry counts of ``tensors``, as arrays that live as long
    as the caller holds them (ctypes only sees their addresses)."""
    ptrs = np.fromiter((t.data_ptr() for t in tensors), dtype=np.uintp, count=len(tensors))
    numels = np.fromiter((t.numel() for t in tensors), dtype=np.int64, count=len(tensors))
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
            self.kernels = _load_or_build()
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


def _load_or_build() -> CpuKernels:
    """The verified cached library, loaded and probed; rebuilt if it is absent, does not
    match its manifest, or fails to load or to pass the probe."""
    source = SOURCE.read_bytes()
    cc = _compiler()
    key = hashlib.sha256(
        b"\0".join([_CACHE_FORMAT, source, cc.encode(), _cpu_fingerprint().encode()])
    ).hexdigest()[:16]
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache)
    manifest = cache / f"cpu_kernels-{key}.json"
    cached = _verified_library(cache, manifest)
    if cached is not None:
        try:
            return _load_and_probe(cached)
        except Exception:  # verified yet unusable: build it again
            pass
    return _load_and_probe(_build(cache, key, cc, manifest))


def _verified_library(cache: Path, manifest: Path) -> Path | None:
    """The library ``manifest`` names, if its size, sha256 and ELF headers match;
    else ``None`` (absent, unreadable, truncated or corrupt: to be rebuilt)."""
    try:
        entry = json.loads(manifest.read_text())
        path = cache / entry["library"]
        if path.parent != cache or not path.name.startswith("cpu_kernels-"):
            return None
        data = path.read_bytes()
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return None
    return path if _complete_elf(data) else None


def _complete_elf(data: bytes) -> bool:
    """Whether every program segment and the section headers of an ELF file lie inside
    it (mapping a segment past the end is what raises SIGBUS). Other formats (Mach-O)
    pass: their size and sha256 were checked."""
    if data[:4] != b"\x7fELF":
        return platform.system() == "Darwin" and len(data) > 0
    if len(data) < 52 or data[4] not in (1, 2) or data[5] not in (1, 2):
        return False
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    try:
        if wide:
            phoff, shoff = struct.unpack_from(order + "QQ", data, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 0x36)
            segment = order + "I4xQ16xQ"  # p_type, p_offset, p_filesz
        else:
            phoff, shoff = struct.unpack_from(order + "II", data, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 0x2A)
            segment = order + "II8xI"
        if phoff + phentsize * phnum > len(data) or shoff + shentsize * shnum > len(data):
            return False
        for i in range(phnum):
            _, offset, size = struct.unpack_from(segment, data, phoff + i * phentsize)
            if offset + size > len(data):
                return False
    except struct.error:
        return False
    return phnum > 0


def _build(cache: Path, key: str, cc: str, manifest: Path) -> Path:
    """Compile the library and publish it (atomically: the library under a name holding
    its sha256, then the manifest; concurrent processes each publish a complete pair)."""
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    errors = []
    for flags in (["-O3", "-march=native"], ["-O3"]):
        tmp = _temp_path(cache, key)
        try:
            command = [cc, *flags, "-std=c99", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)]
            command.append("-lm")  # sqrt
            returncode, stderr = _compile(command)
            if returncode != 0:
                errors.append(stderr.strip() or f"{cc} exited with {returncode}")
                continue
            data = tmp.read_bytes()
            if not _complete_elf(data):
                errors.append(f"{cc} wrote an incomplete library ({len(data)} bytes)")
                continue
            digest = hashlib.sha256(data).hexdigest()
            library = cache / f"cpu_kernels-{key}-{digest[:16]}{suffix}"
            os.replace(tmp, library)
            entry = {"library": library.name, "size": len(data), "sha256": digest}
            listing = _temp_path(cache, key)
            try:
                listing.write_text(json.dumps(entry))
                os.replace(listing, manifest)
            finally:
                listing.unlink(missing_ok=True)
            return library
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError(f"C compiler failed: {errors[-1]}")


def _temp_path(cache: Path, key: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".cpu_kernels-{key}-", suffix=".tmp", dir=cache)
    os.close(fd)
    return Path(name)


def _remove_stale_temps(cache: Path) -> None:
    """Temporary files of builds killed before they could clean up."""
    cutoff = time.time() - _STALE_TEMP_S
    for path in cache.glob(".cpu_kernels-*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def _compile(command: list[str]) -> tuple[int, str]:
    """Run the compiler; on timeout kill it and everything it started."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=os.name == "posix",  # its own group, killed as one
        )
        try:
            returncode = process.wait(timeout=_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill(process)
            raise RuntimeError(
                f"C compiler timed out after {_BUILD_TIMEOUT_S:g} s: {command[0]}"
            ) from None
        stderr.seek(0)
        return returncode, stderr.read()


def _kill(process: subprocess.Popen[str]) -> None:
    try:
        if os.name == "posix":
            os.killpg(process.pid, 9)
        else:
            process.kill()
    except OSError:
        pass
    process.wait()


def _load_and_probe(path: Path) -> CpuKernels:
    """Load the library and check each kernel against torch on a tiny tensor."""
    kernels = CpuKernels(ctypes.CDLL(str(path)))
    x = torch.tensor([3.0, -4.0, 0.0, 0.5] * 5)  # one 16-lane pass and a remainder
    a, y = x.abs().double(), x.view(5, 4)
    zero = torch.zeros((), dtype=torch.float64)
    stats = torch.stack([a.square().sum().sqrt(), a.max(), a.sum(), (a != 0).sum(), zero])
    checks = [
        (kernels.grad_stats([x])[:, 0], stats),
        (kernels.sum_squares([x]), a.square().sum().reshape(1)),
        (kernels.active_per_unit(y, -1), (y > 0).sum(0)),
        (kernels.count_active(x), (x > 0).sum()),
        (kernels.count_in_tails(x, (-1.0, 1.0)), (x.abs() >= 1).sum()),
    ]
    for got, want in checks:
        got, want = got.double(), want.double()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=0.0):
            raise RuntimeError(f"the C kernels in {path.name} failed their load probe")
    return kernels


__all__ = [
    "CACHE_ENV",
    "NATIVE_ENV",
    "CpuKernels",
    "build_failure",
    "build_status",
    "cpu_kernels",
    "eligible",
    "forget_build",
    "wait_for_kernels",
]
