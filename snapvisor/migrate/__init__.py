"""Moving a running VM to another host: live pre-copy migration over TCP.

    # host B
    received = snapvisor.migrate.receive("192.0.2.2:7000", repos=["s3://bucket/repo"])
    # host A
    stats = snapvisor.migrate.migrate(vm, "192.0.2.2:7000", repo="s3://bucket/repo")

docs/migration.md describes the stream and the failure semantics.
"""

from snapvisor.migrate.errors import HandoverUnconfirmed, MigrationError, StreamError
from snapvisor.migrate.receiver import Received, listen, receive
from snapvisor.migrate.sender import MigrationStats, migrate

__all__ = ["HandoverUnconfirmed", "MigrationError", "StreamError", "MigrationStats", "Received", "listen", "migrate",
           "receive"]
