"""snapvisor.testguest.build(): a cached, atomic build of the guest with gcc."""

import shutil
import threading

import pytest

from snapvisor import testguest
from snapvisor.errors import SnapvisorError


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPVISOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "testguest"


def test_build_is_cached_by_source_hash_and_force_rebuilds(fresh_cache):
    elf = testguest.build()
    assert elf.parent.parent == fresh_cache and elf.read_bytes()[:4] == b"\x7fELF"
    first = elf.stat().st_mtime_ns
    assert testguest.build() == elf and elf.stat().st_mtime_ns == first
    data = elf.read_bytes()
    assert testguest.build(force=True) == elf
    assert elf.stat().st_mtime_ns != first and elf.read_bytes() == data  # reproducible
    assert [p.name for p in elf.parent.iterdir()] == ["testguest.elf"]  # no temp dirs left


def test_concurrent_builds_all_get_a_complete_image(fresh_cache):
    results, errors = [], []

    def run():
        try:
            results.append(testguest.build().read_bytes())
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(set(results)) == 1


def test_missing_sources_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(testguest, "SOURCE_DIR", tmp_path / "nowhere")
    with pytest.raises(testguest.TestGuestSourceError, match="sources not found"):
        testguest.build()


def test_missing_compiler_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(testguest.TestGuestToolchainError, match="gcc") as exc:
        testguest.build()
    assert isinstance(exc.value, SnapvisorError)


def test_compile_error_is_reported_with_compiler_output(tmp_path, monkeypatch, fresh_cache):
    src = tmp_path / "src"
    shutil.copytree(testguest.SOURCE_DIR, src, ignore=shutil.ignore_patterns("out"))
    (src / "user" / "workload.c").write_text("#error broken on purpose\n")
    monkeypatch.setattr(testguest, "SOURCE_DIR", src)
    with pytest.raises(testguest.TestGuestBuildError, match="broken on purpose"):
        testguest.build()
    assert not list(fresh_cache.glob("*/testguest.elf"))
