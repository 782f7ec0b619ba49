"""Building, caching and verifying the optional CPU kernels (``cpu_kernels.c``); the
build runs in :mod:`.native`'s background thread, which calls :func:`load_or_build`.

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
import time
from pathlib import Path

import torch
from gradwatch.adapters.torch.native import CACHE_ENV, CpuKernels

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# A first build took ~0.5 s here; the build runs in the background, so this only bounds
# how long a wedged compiler lingers before it is killed.
_BUILD_TIMEOUT_S = 60.0
# Temporary files older than this were left by a killed process, not by a live build.
_STALE_TEMP_S = 3600.0
# Bumped when the cache layout changes, so old entries are never read.
_CACHE_FORMAT = b"gradwatch-kernels-2"


def load_or_build() -> CpuKernels:
    """The verified cached kernels, loaded and probed; built first when needed."""
    return _load_or_build()


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
    bad = torch.tensor([math.inf, -math.inf, math.nan, 1.0] * 5)
    zero = torch.zeros((), dtype=torch.float64)
    stats = torch.stack([a.square().sum().sqrt(), a.max(), a.sum(), (a != 0).sum(), zero])
    checks = [
        (kernels.grad_stats([x])[:, 0], stats),
        (kernels.sum_squares([x]), a.square().sum().reshape(1)),
        (kernels.active_per_unit(y, -1), (y > 0).sum(0)),
        (kernels.count_active(x), (x > 0).sum()),
        (kernels.count_in_tails(x, (-1.0, 1.0)), (x.abs() >= 1).sum()),
        (kernels.count_nonfinite(bad), (~torch.isfinite(bad)).sum()),
    ]
    for got, want in checks:
        got, want = got.double(), want.double()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=0.0):
            raise RuntimeError(f"the C kernels in {path.name} failed their load probe")
    return kernels


__all__ = ["SOURCE", "load_or_build"]
