"""Fault injection into the C kernels' cache (issue #15): a truncated, corrupt or
garbage library is never loaded (that killed the process with SIGBUS) but rebuilt; a
wedged compiler does not hold up ``watch()`` and leaves no temporary file; two
processes building into one cache both get working kernels.

Loads of a damaged cache run in a fresh subprocess (a process that has loaded the
library once would reuse its mapping), so a SIGBUS fails the test instead of killing
pytest."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import native, native_build  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, mlp, record_stats  # noqa: E402

import gradwatch  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler"
    ),
    pytest.mark.skipif(os.name != "posix", reason="shell-script compilers, ELF libraries"),
]

# Loads the kernels from the cache, then checks them against torch.
_CHILD = """
import json, torch
from gradwatch.adapters.torch import native
kernels = native.wait_for_kernels(120)
g = torch.randn(5000)
ok = kernels is not None and torch.allclose(
    kernels.grad_stats([g])[0, 0].double(), g.double().norm(), rtol=1e-6
)
print(json.dumps({"ready": kernels is not None, "ok": bool(ok),
                  "failure": native.build_failure()}))
"""


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding one good build (made once)."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    with mock.patch.dict(os.environ, {native.CACHE_ENV: str(cache)}):
        native_build._load_or_build()  # damage is done to copies: this path stays intact
    return cache


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)  # also under GRADWATCH_NATIVE=0
    native.forget_build()
    yield tmp_path
    native.forget_build()


def _children(caches: list[Path], env: dict[str, str] | None = None) -> list[dict[str, object]]:
    """Run the child in parallel, one per cache directory; each must exit cleanly."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            env={
                **os.environ,
                native.CACHE_ENV: str(cache),
                native.NATIVE_ENV: "1",
                "OMP_NUM_THREADS": "1",
                **(env or {}),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cache in caches
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, f"exit {process.returncode} (-7 is SIGBUS): {err[-2000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _library(cache: Path) -> Path:
    (library,) = cache.glob("cpu_kernels-*.so")
    return library


def _truncate(library: Path) -> None:
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])


def _flip_a_byte(library: Path) -> None:
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))


def _garbage(library: Path) -> None:
    library.write_bytes(os.urandom(library.stat().st_size))


def _truncate_and_forge_the_manifest(library: Path) -> None:
    """A truncated library whose manifest matches it: the ELF check must still catch it."""
    import hashlib

    _truncate(library)
    data = library.read_bytes()
    (manifest,) = library.parent.glob("*.json")
    entry = {"library": library.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest.write_text(json.dumps(entry))


def _garbage_manifest(library: Path) -> None:
    (manifest,) = library.parent.glob("*.json")
    manifest.write_text("{not json")


# Each is loaded in a fresh process; the checks that need no load run in this one.
_DAMAGE_LOADED: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate,
    "truncated_with_a_matching_manifest": _truncate_and_forge_the_manifest,
}
_DAMAGE_CHECKED: dict[str, Callable[[Path], None]] = {
    **_DAMAGE_LOADED,
    "garbage": _garbage,
    "a_flipped_byte": _flip_a_byte,
    "garbage_manifest": _garbage_manifest,
}


@pytest.mark.parametrize("damage", list(_DAMAGE_CHECKED))
def test_a_damaged_cache_fails_verification(damage: str, built_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    manifest = next(cache.glob("*.json"))
    assert native_build._verified_library(cache, manifest) == _library(cache)
    _DAMAGE_CHECKED[damage](_library(cache))
    assert native_build._verified_library(cache, manifest) is None


def test_a_damaged_cache_is_rebuilt_and_never_loaded(built_cache: Path, tmp_path: Path) -> None:
    caches = []
    for name, damage in _DAMAGE_LOADED.items():
        cache = tmp_path / name
        shutil.copytree(built_cache, cache)
        damage(_library(cache))
        caches.append(cache)
    for cache, result in zip(caches, _children(caches), strict=True):
        assert result == {"ready": True, "ok": True, "failure": None}, cache.name
        # the rebuilt library matches its manifest again; no temporary file is left
        assert native_build._verified_library(cache, next(cache.glob("*.json"))), cache.name
        assert not list(cache.glob(".*")), cache.name


def test_two_processes_building_into_one_cache_both_get_working_kernels(tmp_path: Path) -> None:
    results = _children([tmp_path, tmp_path])
    assert all(r == {"ready": True, "ok": True, "failure": None} for r in results), results
    assert native_build._verified_library(tmp_path, next(tmp_path.glob("*.json"))) is not None
    assert not list(tmp_path.glob(".*"))


def test_a_wedged_compiler_neither_blocks_watch_nor_leaves_files(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fresh_build / "wedged-cc"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setattr(native_build, "_BUILD_TIMEOUT_S", 1.0)
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=2, width=16, inp=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.monotonic()
    gw = gradwatch.watch(model, opt, grad_schedule=EVERY_STEP, on_finding="ignore", show=False)
    seen = record_stats(gw)
    reference = []
    for _ in range(3):
        model(torch.randn(8, 16)).square().mean().backward()
        reference.append([float(p.grad.double().norm()) for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    gw.flush()
    assert time.monotonic() - started < 5.0  # a hang check: the build takes >= 1 s here
    for stats, want in zip(seen, reference, strict=True):
        assert list(stats.grad_norm) == pytest.approx(want, rel=1e-5)
    assert native.wait_for_kernels(20) is None
    assert "timed out" in (native.build_failure() or "")
    assert [p.name for p in fresh_build.iterdir()] == ["wedged-cc"]  # no temporary file
    report = gw.report(show=False)
    gw.close()
    assert any("timed out" in note for note in report.notes)
