"""The S3 server goes away for a while during a schedule: the guest never stops,
each failed attempt is reported and retried with back-off, snapshots resume when
the server is back, and the first one after the outage holds every page dirtied
since the last good one (restoring it, the guest verifies all its memory).

The test runs its own SeaweedFS (.ci/s3-server with a private SNAPVISOR_S3_DIR)
so that it can stop it and start it again on the same data."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import boto3
import botocore.config
import pytest

from snapvisor.store import Repository

from cli_helpers import (Foreground, assert_healthy, last_rounds, rounds, wait_for_api,
                         wait_for_guest, wait_until)

pytestmark = [pytest.mark.kvm, pytest.mark.s3]
# A slow writer (256 pages/s over 2048, 8 rounds/s): many pages dirtied during the
# outage are not written again before the snapshot that follows it, so one that
# forgot them would restore stale pages.
OUTAGE_CMDLINE = "console=ttyS0 tg.mem=8 tg.rate=1 tg.pages=32 tg.rounds=0"
REPO_ROOT = Path(__file__).resolve().parents[2]


class PrivateS3:
    """A `weed mini` of this test's own, stoppable and restartable on its data."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = dict(os.environ, SNAPVISOR_S3_DIR=str(state))
        self.script = str(REPO_ROOT / ".ci" / "s3-server")
        started = subprocess.run([self.script, "start"], env=self.env, capture_output=True, text=True, timeout=120)
        if started.returncode:
            pytest.skip(f"cannot start a private S3 server: {started.stderr[-500:]}")
        values = {}
        for line in (state / "env").read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            values[name] = shlex.split(value)[0]
        self.endpoint = values["SNAPVISOR_TEST_S3_ENDPOINT"]
        self.credentials = {"AWS_ACCESS_KEY_ID": values["AWS_ACCESS_KEY_ID"],
                            "AWS_SECRET_ACCESS_KEY": values["AWS_SECRET_ACCESS_KEY"]}
        self.pid = int((state / "weed.pid").read_text())
        self.restarted: subprocess.Popen | None = None
        self.command = Path(f"/proc/{self.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
                            config=botocore.config.Config(s3={"addressing_style": "path"},
                                                          retries={"max_attempts": 1}, connect_timeout=2))

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{self.pid}").exists() or
                   Path(f"/proc/{self.pid}/stat").read_text().split()[2] == "Z", 60, "weed to exit")

    def start_again(self) -> None:
        with open(self.state / "weed.log", "ab") as log:
            process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True)
        self.restarted = process
        self.pid = process.pid
        (self.state / "weed.pid").write_text(str(self.pid))

        def serves() -> bool:
            try:
                self.client().list_objects_v2(Bucket="outage", MaxKeys=1)
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_until(serves, 90, "the S3 server to serve again", interval=0.5)

    def close(self) -> None:
        # Its data is thrown away: no need for the graceful (slow) stop.
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.restarted is not None:
            self.restarted.wait(10)  # reap it, or the script's stop waits on a zombie
        subprocess.run([self.script, "stop"], env=self.env, capture_output=True, timeout=60)


@pytest.fixture
def private_s3(tmp_path: Path):
    server = PrivateS3(tmp_path / "s3")
    try:
        server.client().create_bucket(Bucket="outage")
        yield server
    finally:
        server.close()


def test_store_outage_during_a_schedule(testguest: Path, tmp_path: Path, private_s3: PrivateS3) -> None:
    env = {"AWS_ENDPOINT_URL": private_s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "2", **private_s3.credentials}
    repo = "s3://outage/vm"
    sock = tmp_path / "run.sock"
    run = Foreground("run", "--kernel", str(testguest), "--mem", "64M", "--cmdline", OUTAGE_CMDLINE,
                     "--name", "outage", "--api-sock", str(sock), "--snapshot-every", "1s", "--repo", repo, env=env)
    try:
        api = wait_for_api(sock, run)
        target = lambda: api.schedule()["targets"][0]  # noqa: E731
        wait_until(lambda: target()["snapshots"] >= 2, 30, "two snapshots before the outage")

        private_s3.stop()
        before = target()
        last_good = before["last_snapshot"]
        wait_until(lambda: target()["consecutive_failures"] >= 1, 30, "a failed attempt")
        rounds_at_outage = last_rounds(run.getvalue())[0]
        failing = wait_until(lambda: (lambda t: t if t["consecutive_failures"] >= 3 else None)(target()),
                             60, "three failed attempts")
        assert failing["last_snapshot"] == last_good and failing["last_error"]
        assert failing["next_run"] > failing["last_error_at"]
        # The guest runs on through the outage (the attempts may fail fast, so give
        # it time rather than expecting a count by the third failure).
        wait_until(lambda: last_rounds(run.getvalue())[0] > rounds_at_outage + 5, 15, "the guest to run on")
        assert api.vm()["state"] == "Running"
        assert target()["last_snapshot"] == last_good  # still in the outage: nothing committed
        # The operator hears of it on stderr (read from a pipe: allow it a moment).
        wait_until(lambda: "scheduled snapshot into s3://outage/vm failed (1 in a row)" in run.stderr, 5,
                   "the failure on stderr")
        assert "no dirty page is lost" in run.stderr
        rounds_before_return = last_rounds(run.getvalue())[0]

        private_s3.start_again()
        recovered = wait_until(lambda: (lambda t: t if t["snapshots"] > before["snapshots"] else None)(target()),
                               60, "a snapshot after the outage")
        assert recovered["consecutive_failures"] == 0 and recovered["failures"] >= 3
        wait_until(lambda: "work again after" in run.stderr, 5, "the recovery on stderr")
        first_after = recovered["last_snapshot"]
        api.shutdown()
        assert run.wait() == 0, run.stderr
    finally:
        run.kill()
    assert_healthy(run.getvalue())

    # Restore exactly the first snapshot after the outage, not a later one. It is an
    # incremental on the last snapshot before the outage, so if it missed a page
    # dirtied during the outage, the restored guest would find that page stale
    # against its sequence table (rewritten every round) and report VERIFY FAIL.
    with Repository.open_url(repo, endpoint_url=private_s3.endpoint,
                             access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"]) as opened:
        snapshot = opened.get_snapshot(first_after).info
    assert snapshot.parent == last_good and snapshot.meta["kind"] == "incremental"
    restored = Foreground("restore", "--repo", repo, first_after, "--api-sock", str(tmp_path / "r.sock"), env=env)
    try:
        restored_api = wait_for_api(tmp_path / "r.sock", restored)
        console = wait_for_guest(restored, 3)
        assert rounds(console)[0][1] > rounds_before_return
        restored_api.shutdown()
        assert restored.wait() == 0, restored.stderr
    finally:
        restored.kill()
    assert_healthy(restored.getvalue())
