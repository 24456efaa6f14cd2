"""The migration security flags: all three TLS files or none, never with
--insecure, never through `migrate --api-sock` (the VM's process holds them), and
files that do not make a certificate and its key are refused before anything runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cli_helpers import snapvisor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "migrate"))  # as tests/net/netlab.py does
from tls_certs import Ca  # noqa: E402


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = Ca(directory, "cli")
    host, other = ca.issue("host", "127.0.0.1"), ca.issue("other", "127.0.0.1")
    return host.cert, other.key, ca.path  # a certificate with another certificate's key


@pytest.mark.parametrize("args, code, error", [
    (["receive", "--listen", "127.0.0.1:0", "--tls-cert", "c.pem"],
     2, "TLS needs all of --tls-cert, --tls-key and --tls-ca: --tls-key, --tls-ca missing"),
    (["receive", "--listen", "127.0.0.1:0", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem",
      "--insecure"], 2, "--insecure turns TLS off"),
    (["migrate", "--api-sock", "/nonexistent.sock", "--to", "127.0.0.1:7000", "--tls-ca", "ca.pem"],
     2, "--tls-ca: only for a VM booted here (--kernel); a running VM keeps its own"),
    (["migrate", "--api-sock", "/nonexistent.sock", "--to", "127.0.0.1:7000", "--insecure"],
     2, "--insecure: only for a VM booted here"),
    (["receive", "--listen", "192.0.2.20:7000"], 1, "listening on 192.0.2.20:7000 without TLS is refused"),
    (["receive", "--listen", "0.0.0.0:7000"], 1, "or --insecure to send the VM in clear"),
])
def test_bad_security_flags_are_refused_with_the_way_out(args: list[str], code: int, error: str) -> None:
    done = snapvisor(*args)
    assert done.returncode == code and error in done.stderr, done.stderr


def test_a_key_that_is_not_the_certificates_is_refused_before_listening(certificate) -> None:
    cert, wrong_key, ca = certificate
    done = snapvisor("receive", "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(wrong_key),
                     "--tls-ca", str(ca))
    assert done.returncode == 1, done.stderr
    assert f"cannot use the TLS certificate {cert} with key {wrong_key}: key values mismatch" in done.stderr
    assert "waiting for a migration" not in done.stderr
