"""The operator's path end to end, through the `snapvisor` command: a guest runs
with a snapshot every second into a local and an S3 repository with retention;
prune leaves exactly what the keep rules say; verify passes; restoring the
newest snapshot resumes the guest, which verifies every page it owns."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from cli_helpers import (GUEST_CMDLINE, Foreground, assert_healthy, rounds, s3_env, snapvisor,
                         wait_for_api, wait_for_guest, wait_until)

pytestmark = [pytest.mark.kvm, pytest.mark.s3]


def listed(repo: str, env: dict[str, str]) -> list[dict]:
    result = snapvisor("ls", "--repo", repo, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_scheduled_snapshots_retention_verify_and_restore(testguest: Path, tmp_path: Path, s3_server,
                                                          s3_bucket: str) -> None:
    env = s3_env(s3_server)
    local = str(tmp_path / "repo")
    remote = f"s3://{s3_bucket}/cli-{secrets.token_hex(3)}"
    sock = tmp_path / "run.sock"
    run = Foreground("run", "--kernel", str(testguest), "--mem", "64M", "--cmdline", GUEST_CMDLINE,
                     "--name", "sched", "--api-sock", str(sock), "--snapshot-every", "1s",
                     "--repo", local, "--repo", remote, "--keep-last", "3", env=env)
    try:
        api = wait_for_api(sock, run)
        targets = wait_until(
            lambda: (lambda t: t if all(x["snapshots"] >= 5 for x in t) else None)(api.schedule()["targets"]),
            60, "5 scheduled snapshots in each repository")
        assert [t["repo"] for t in targets] == [local, remote]
        assert all(t["failures"] == 0 and t["last_error"] is None for t in targets), targets
        assert all(t["last_prune"]["kept"] == 3 for t in targets), targets
        assert api.vm()["state"] == "Running"
        # A bad request from the CLI is refused and changes nothing.
        refused = snapvisor("snapshot", "--api-sock", str(sock), "--repo", local, "--tag", "two words", env=env)
        assert refused.returncode == 1 and "tag name 'two words' is invalid" in refused.stderr
        assert "Traceback" not in refused.stderr
        manual = snapvisor("snapshot", "--api-sock", str(sock), "--repo", local, "--tag", "manual", env=env)
        assert manual.returncode == 0 and "(incremental)" in manual.stdout, manual.stderr
        wait_for_guest(run, 3)
        api.shutdown()
        assert run.wait() == 0, run.stderr
    finally:
        run.kill()
    assert run.stderr == ""  # no failed snapshot or prune was reported
    assert_healthy(run.getvalue())

    for repo in (local, remote):
        snapshots = listed(repo, env)
        # --keep-last 3 after each scheduled snapshot: the three newest, consecutive
        # (each the parent of the next), plus at most the manual one taken between two
        # prunes in the local repository.
        assert all(s["vm"] == "sched" for s in snapshots)
        assert 3 <= len(snapshots) <= (4 if repo == local else 3), snapshots
        newest3 = snapshots[-3:]
        assert [s["parent"] for s in newest3[1:]] == [s["id"] for s in newest3[:-1]], snapshots

        # prune through the CLI: a dry run changes nothing, the real one keeps exactly two.
        dry = snapvisor("prune", "--repo", repo, "--keep-last", "2", "--dry-run", "--json", env=env)
        assert dry.returncode == 0, dry.stderr
        plan = json.loads(dry.stdout)
        assert plan["keep"] == [s["id"] for s in reversed(snapshots[-2:])]
        assert sorted(plan["remove"]) == sorted(s["id"] for s in snapshots[:-2])
        assert listed(repo, env) == snapshots
        done = snapvisor("prune", "--repo", repo, "--keep-last", "2", env=env)
        assert done.returncode == 0 and "2 kept" in done.stdout, done.stderr
        assert [s["id"] for s in listed(repo, env)] == [s["id"] for s in snapshots[-2:]]

        gc = snapvisor("gc", "--repo", repo, "--json", env=env)
        assert gc.returncode == 0 and json.loads(gc.stdout)["snapshots"] == 2, gc.stderr
        verify = snapvisor("verify", "--repo", repo, "--read-data", "--json", env=env)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        assert report["ok"] and report["errors"] == [] and report["counts"]["snapshots"] == 2

        # Restore the newest: the guest continues from it (no new boot banner, its
        # round counter goes on) and verifies all its memory.
        newest = snapshots[-1]
        restore_sock = tmp_path / f"restore-{len(repo)}.sock"
        # From S3 lazily; locally eagerly, and protected again on a schedule.
        extra = ["--lazy"] if repo == remote else ["--snapshot-every", "3s", "--keep-last", "2"]
        restored = Foreground("restore", "--repo", repo, newest["id"][:10], *extra, "--api-sock", str(restore_sock),
                              env=env)
        try:
            restored_api = wait_for_api(restore_sock, restored)
            assert restored_api.vm()["name"] == "sched"
            console = wait_for_guest(restored, 2)
            assert not console.startswith(b"tg: snapvisor-testguest")
            assert rounds(console)[0][1] > 5, console[:200]
            if repo == local:
                target = wait_until(lambda: (lambda t: t if t["snapshots"] >= 1 else None)(
                    restored_api.schedule()["targets"][0]), 20, "a scheduled snapshot of the restored VM")
                assert target["snapshots"] == 1, target  # the next is 3 s later
                shown = snapvisor("show", "--repo", repo, target["last_snapshot"], "--json", env=env)
                first = json.loads(shown.stdout)
                # Incremental against the snapshot it was restored from.
                assert first["parent"] == newest["id"] and first["meta"]["kind"] == "incremental"
            restored_api.shutdown()
            assert restored.wait() == 0, restored.stderr
        finally:
            restored.kill()
        assert_healthy(restored.getvalue())
