"""The test guest snapshotted into encrypted repositories (a local directory and
the S3 server): no byte of its memory, and no SHA-256 of its pages, is anywhere in
the repository; eager and lazy restores from it run the guest on, checking every
page it owns."""

from __future__ import annotations

import io

import pytest

import snapvisor
from guest_console import assert_healthy, wait_for_rounds
from snapvisor.store import Repository
from snapvisor.store.pagehash import hash_pages
from testsupport import page_words, s3_options, words_found

pytestmark = pytest.mark.kvm
GUEST = "console=ttyS0 tg.mem=8 tg.rate=10 tg.pages=256 tg.rounds=0"
PASSWORD = "guest secrets stay secret"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def repo(request, tmp_path) -> Repository:
    if request.param == "local":
        return Repository.open_url(str(tmp_path / "repo"), create=True, password=PASSWORD)
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Repository.open_url(f"s3://{bucket}/encrypted-{tmp_path.name}", create=True, password=PASSWORD,
                               **s3_options(server))


def test_guest_in_an_encrypted_repository(testguest, repo: Repository) -> None:
    assert repo.encrypted
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="32M", cmdline=GUEST, serial_out=out, name="secret")
    try:
        wait_for_rounds(out, 1, 2)
        full = vm.snapshot(repo)
        wait_for_rounds(out, 1, 4)
        incremental = vm.snapshot(repo)
    finally:
        vm.close()

    snapshot = repo.get_snapshot(incremental.id)
    reader = snapshot.region_reader("ram0")
    ram = bytearray(reader.size)
    reader.read_into(ram)
    ids, nonzero = hash_pages(ram)
    needles = page_words(ram, ids[nonzero])
    assert len(needles) > 1000  # the guest's working set, and its kernel
    assert words_found(repo.store, needles) == 0

    for snapshot_id, lazy in ((full.id, False), (incremental.id, True)):
        out = io.BytesIO()
        vm = snapvisor.restore(repo, snapshot_id, lazy=lazy, serial_out=out)
        try:
            wait_for_rounds(out, 1, 2)
            if lazy:
                assert vm.lazy_memory is not None and vm.lazy_memory.wait(30)
                assert vm.lazy_memory.error is None
            assert_healthy(out.getvalue())
        finally:
            vm.close()
