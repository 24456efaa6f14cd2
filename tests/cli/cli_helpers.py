"""Running the `snapvisor` command as an operator does: subprocesses, the guest
console read from a pipe as it comes, the API asked through its socket."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "snapshot"))

from guest_console import assert_healthy, last_rounds, rounds, wait_for_rounds  # noqa: E402

from snapvisor.control import ApiClient, ApiUnreachable  # noqa: E402
from testsupport import wait_until  # noqa: F401  (re-exported for the tests here)

__all__ = ["assert_healthy", "last_rounds", "rounds", "wait_for_rounds", "wait_for_guest", "snapvisor", "Foreground",
           "wait_for_api", "wait_until", "s3_env"]

GUEST_CMDLINE = "console=ttyS0 tg.mem=8 tg.rate=10 tg.pages=256 tg.rounds=0"


def s3_env(s3_server: tuple[str, str, str]) -> dict[str, str]:
    endpoint, key, secret = s3_server
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1"}


def snapvisor(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapvisor", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


class Foreground:
    """`snapvisor run`/`restore` in the background of a test: its stdout (the guest
    console) collected by a thread, readable with getvalue() like a BytesIO."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "snapvisor", *args], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env={**os.environ, **(env or {})})
        self._out = io.BytesIO()
        self._err = io.BytesIO()
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.process.stdout, self._out), (self.process.stderr, self._err))]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream, sink: io.BytesIO) -> None:
        while chunk := stream.read1(65536):
            with self._lock:
                sink.write(chunk)

    def getvalue(self) -> bytes:
        with self._lock:
            return self._out.getvalue()

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.getvalue().decode(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def wait_for_guest(process: Foreground, count: int, timeout: float = 60) -> bytes:
    """wait_for_rounds on a snapvisor process, with its stderr when it fails (a
    lazy restore under a loaded machine may take a while for the first rounds)."""
    try:
        return wait_for_rounds(process, 1, count, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nexit status {process.process.poll()}, stderr: {process.stderr[-2000:]}") from None




def wait_for_api(sock: Path, process: Foreground, timeout: float = 30) -> ApiClient:
    api = ApiClient(sock, timeout=30)

    def answers() -> bool:
        assert process.process.poll() is None, f"snapvisor exited: {process.stderr}"
        try:
            return api.vm()["state"] == "Running"
        except ApiUnreachable:
            return False

    wait_until(answers, timeout, f"the API on {sock}")
    return api
