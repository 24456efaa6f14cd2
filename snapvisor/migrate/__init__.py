"""Moving a running VM to another host: live pre-copy migration over TCP.

    # host B
    received = snapvisor.migrate.receive("192.0.2.2:7000", repos=["s3://bucket/repo"])
    # host A
    stats = snapvisor.migrate.migrate(vm, "192.0.2.2:7000", repo="s3://bucket/repo")

Between hosts the stream runs over mutual TLS 1.3 (`Protection(MigrationTls(TlsFiles(...)))`);
plaintext is allowed on loopback only, or with `Protection(insecure=True)`.
docs/migration.md describes the stream and the failure semantics.
"""

from snapvisor.migrate.errors import HandoverUnconfirmed, MigrationError, StreamError
from snapvisor.migrate.receiver import Received, listen, receive
from snapvisor.migrate.sender import MigrationStats, migrate
from snapvisor.migrate.tls import MigrationTls, Protection, TlsFiles, TlsRefused

__all__ = ["HandoverUnconfirmed", "MigrationError", "MigrationTls", "Protection", "StreamError", "MigrationStats",
           "Received", "TlsFiles", "TlsRefused", "listen", "migrate", "receive"]
