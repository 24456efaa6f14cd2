"""Two test hosts on one machine: network namespaces on a bridge, each running its
own snapvisor process, and an S3 server (SeaweedFS) both can reach.

    switch namespace: bridge br0, 192.0.2.1 (the S3 server listens here)
    host A namespace: eth0 192.0.2.10 --veth-- switch
    host B namespace: eth0 192.0.2.20 --veth-- switch

Addresses are from TEST-NET-1 (RFC 5737) only. A namespace cannot reach the
machine's 127.0.0.1, which is why the S3 server runs in the switch namespace.
Everything created here is removed again by `close()`, which the fixtures call
also when a test fails.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
SWITCH_ADDRESS = "192.0.2.1"
PREFIX = 24


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def netns_available() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"svprobe{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
    except (RuntimeError, FileNotFoundError) as exc:
        return f"cannot create a network namespace: {exc}"
    ip("netns", "del", probe)
    return None


class Process:
    """A snapvisor (or other) process inside a namespace, output in files."""

    def __init__(self, argv: list[str], env: dict[str, str], workdir: Path, label: str) -> None:
        self.label = label
        self.stdout_path = workdir / f"{label}.out"
        self.stderr_path = workdir / f"{label}.err"
        self._out: IO[bytes] = open(self.stdout_path, "wb")
        self._err: IO[bytes] = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> bytes:
        return self.stdout_path.read_bytes()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def wait_for_stderr(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            err = self.stderr()
            if text in err:
                return err
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.label} exited ({self.popen.returncode}) before printing {text!r}: {err}")
            time.sleep(0.05)
        raise AssertionError(f"{self.label} did not print {text!r} in {timeout} s: {self.stderr()}")

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(30)
        self._out.close()
        self._err.close()


class Host:
    """One test host: a namespace with one interface on the switch."""

    def __init__(self, lab: "Switch", name: str, address: str, workdir: Path) -> None:
        self.lab = lab
        self.ns = f"sv{lab.tag}{name}"
        self.address = address
        self.workdir = workdir
        self.processes: list[Process] = []
        inside, outside = f"eth{lab.tag}{name}", f"sw{lab.tag}{name}"
        self.switch_port = outside
        ip("netns", "add", self.ns)
        try:
            ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            ip("link", "set", outside, "netns", lab.ns)
            ip("-n", lab.ns, "link", "set", outside, "master", "br0", "up")
            ip("link", "set", inside, "netns", self.ns)
            ip("-n", self.ns, "link", "set", inside, "name", "eth0")
            ip("-n", self.ns, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0")
            ip("-n", self.ns, "link", "set", "eth0", "up")
            ip("-n", self.ns, "link", "set", "lo", "up")
        except BaseException:
            ip("netns", "del", self.ns)
            raise

    def run(self, label: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        """`snapvisor ARGS` in this host's namespace."""
        return self.spawn(label, [sys.executable, "-m", "snapvisor", *args], env)

    def spawn(self, label: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        # Each host has its own local caches (index copies): hosts share no files.
        full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SNAPVISOR_CACHE=str(self.workdir / f"{self.ns}-cache"),
                        **self.lab.s3_env, **(env or {}))
        process = Process(["ip", "netns", "exec", self.ns, *argv], full_env, self.workdir, label)
        self.processes.append(process)
        return process

    def cut(self) -> None:
        """Pull this host's cable at the switch: its packets vanish, and the host
        itself sees no link change (no quick 'network unreachable')."""
        ip("-n", self.lab.ns, "link", "set", self.switch_port, "down")

    def limit(self, rate: str) -> None:
        """Shape what this host sends to `rate` (tc rate syntax, e.g. 40mbit)."""
        ip_tc = ["tc", "-n", self.ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                 "burst", "64kb", "latency", "400ms"]
        done = subprocess.run(ip_tc, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"{' '.join(ip_tc)}: {done.stderr.strip()}")

    def close(self) -> None:
        for process in self.processes:
            process.close()
        # Deleting the switch end removes the pair at once; a namespace's own
        # interfaces are only cleaned up some time after `netns del` returns.
        subprocess.run(["ip", "-n", self.lab.ns, "link", "del", self.switch_port], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)


class Switch:
    """The switch namespace (bridge + optional S3 server) the hosts plug into."""

    def __init__(self, workdir: Path) -> None:
        self.tag = secrets.token_hex(2)
        self.ns = f"sv{self.tag}sw"
        self.workdir = workdir
        self.s3_env: dict[str, str] = {}
        self._weed: subprocess.Popen | None = None
        ip("netns", "add", self.ns)
        try:
            ip("-n", self.ns, "link", "add", "br0", "type", "bridge")
            ip("-n", self.ns, "addr", "add", f"{SWITCH_ADDRESS}/{PREFIX}", "dev", "br0")
            ip("-n", self.ns, "link", "set", "br0", "up")
            ip("-n", self.ns, "link", "set", "lo", "up")
        except BaseException:
            ip("netns", "del", self.ns)
            raise

    def host(self, name: str, address: str) -> Host:
        return Host(self, name, address, self.workdir)

    def start_s3(self, timeout: float = 90.0) -> dict[str, str]:
        """A SeaweedFS S3 server inside the switch namespace; returns the
        environment (endpoint, credentials) that snapvisor processes need."""
        state = self.workdir / "s3"
        (state / "data").mkdir(parents=True)
        key, secret = "sv" + secrets.token_hex(8), secrets.token_hex(20)
        (state / "s3.json").write_text(
            '{"identities": [{"name": "snapvisor-test", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
            ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (key, secret))
        ports = {"s3": 8333, "master": 9333, "volume": 8080, "filer": 8888, "admin": 23646}
        log = open(state / "weed.log", "wb")
        self._weed = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "weed", "mini", f"-dir={state / 'data'}", f"-ip={SWITCH_ADDRESS}",
             f"-ip.bind={SWITCH_ADDRESS}", "-master.telemetry=false", f"-master.port={ports['master']}",
             f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
             f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
             "-s3.port.lance=0", f"-s3.config={state / 's3.json'}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        env = {"AWS_ENDPOINT_URL": f"http://{SWITCH_ADDRESS}:{ports['s3']}", "AWS_ACCESS_KEY_ID": key,
               "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
        probe = (
            "import boto3, sys, time\n"
            "c = boto3.client('s3')\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    try:\n"
            "        c.create_bucket(Bucket='snapvisor-migrate')\n"
            "        c.put_object(Bucket='snapvisor-migrate', Key='probe', Body=b'ok')\n"
            "        assert c.get_object(Bucket='snapvisor-migrate', Key='probe')['Body'].read() == b'ok'\n"
            "        sys.exit(0)\n"
            "    except Exception as e:\n"
            "        if time.monotonic() > deadline: sys.exit(f'S3 server not ready: {e}')\n"
            "        time.sleep(0.5)\n"
        )
        ready = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", probe],
                               env=dict(os.environ, **env), capture_output=True, text=True, timeout=timeout + 30)
        if ready.returncode:
            tail = (state / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"S3 server in {self.ns} did not start: {ready.stderr}\n{tail}")
        self.s3_env = env
        return env

    def close(self) -> None:
        if self._weed is not None and self._weed.poll() is None:
            self._weed.send_signal(signal.SIGTERM)
            try:
                self._weed.wait(15)
            except subprocess.TimeoutExpired:
                self._weed.kill()
                self._weed.wait(15)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)


# --- the test guest's console (guests/testguest/README.md) ---------------------------

ROUND = re.compile(rb"^tg: cpu=(\d+) round=(\d+) dirtied=(\d+) verified=(\d+) ticks=(\d+)$", re.M)


def rounds(console: bytes) -> list[tuple[int, int, int]]:
    """(cpu, round, verified pages) of every round line, in order."""
    return [(int(m.group(1)), int(m.group(2)), int(m.group(4))) for m in ROUND.finditer(console)]


def assert_healthy(console: bytes) -> None:
    for bad in (b"VERIFY FAIL", b"FAULT", b"ERROR"):
        assert bad not in console, console[-2000:]


def wait_for_verified_rounds(process: Process, count: int, timeout: float, after: int = -1) -> bytes:
    """Wait until the guest's console shows `count` fully verified rounds numbered
    above `after`; returns the console."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console = process.stdout()
        assert_healthy(console)
        if sum(1 for _, number, verified in rounds(console) if number > after and verified) >= count:
            return console
        if process.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{process.label}: fewer than {count} verified rounds after round {after} "
                         f"(exit {process.popen.poll()}): {process.stdout()[-1500:]!r} {process.stderr()[-1500:]}")
