"""Scheduled and API snapshots into an encrypted repository: `snapvisor run` reads
the password once, at start (the file may be gone afterwards), the API never
carries it, and nothing prints it; `snapvisor restore --lazy --password-file` runs
the guest on from the newest snapshot, snapshotted again on its schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import (GUEST_CMDLINE, Foreground, assert_healthy, rounds, snapvisor, wait_for_api,
                         wait_for_guest, wait_until)

pytestmark = pytest.mark.kvm
PASSWORD = "scheduled secret"
NO_ENV = {"SNAPVISOR_PASSWORD_FILE": "", "SNAPVISOR_PASSWORD_COMMAND": ""}


def test_scheduled_snapshots_into_an_encrypted_repository(testguest: Path, tmp_path: Path) -> None:
    repo, password = str(tmp_path / "repo"), tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    done = snapvisor("init", "--repo", repo, "--password-file", str(password), env=NO_ENV)
    assert done.returncode == 0, done.stderr
    sock = tmp_path / "run.sock"
    run = Foreground("run", "--kernel", str(testguest), "--mem", "64M", "--cmdline", GUEST_CMDLINE,
                     "--name", "sealed", "--api-sock", str(sock), "--snapshot-every", "1s",
                     "--repo", repo, "--password-file", str(password), env=NO_ENV)
    try:
        api = wait_for_api(sock, run)
        kept = password.read_text()
        password.unlink()  # read at start: later snapshots do not need the file
        try:
            wait_until(lambda: api.schedule()["targets"][0]["snapshots"] >= 3 or None, 60,
                       "3 scheduled snapshots")
        except AssertionError as e:
            raise AssertionError(f"{e}: {api.schedule()}; {run.stderr}") from None
        manual = snapvisor("snapshot", "--api-sock", str(sock), "--repo", repo, "--tag", "manual", env=NO_ENV)
        assert manual.returncode == 0, manual.stderr
        [target] = api.schedule()["targets"]
        assert target["failures"] == 0 and target["last_error"] is None, target
        api.shutdown()
        assert run.wait() == 0, run.stderr
    finally:
        run.kill()
    assert PASSWORD not in run.stderr and PASSWORD.encode() not in run.getvalue()
    assert_healthy(run.getvalue())

    password.write_text(kept)
    listed = snapvisor("ls", "--repo", repo, "--json", "--password-file", str(password), env=NO_ENV)
    snapshots = json.loads(listed.stdout)
    assert len(snapshots) >= 4 and any("manual" in s["tags"] for s in snapshots), listed.stderr
    verify = snapvisor("verify", "--read-data", "--repo", repo, "--password-file", str(password), env=NO_ENV)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    refused = snapvisor("ls", "--repo", repo, env=NO_ENV)
    assert refused.returncode == 1 and "encrypted and no password was given" in refused.stderr

    newest = snapshots[-1]["id"]
    restore_sock = tmp_path / "restore.sock"
    restored = Foreground("restore", "--repo", repo, newest[:10], "--lazy", "--password-file", str(password),
                          "--api-sock", str(restore_sock), "--snapshot-every", "2s", env=NO_ENV)
    try:
        restored_api = wait_for_api(restore_sock, restored)
        console = wait_for_guest(restored, 2)
        assert rounds(console)[0][1] > 3, console[:200]  # it goes on from the snapshot
        wait_until(lambda: restored_api.schedule()["targets"][0]["snapshots"] >= 1 or None, 30,
                   "a scheduled snapshot of the restored VM")
        restored_api.shutdown()
        assert restored.wait() == 0, restored.stderr
    finally:
        restored.kill()
    assert_healthy(restored.getvalue())
