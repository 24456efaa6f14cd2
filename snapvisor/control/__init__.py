"""Operating a running VM: the control API (HTTP/JSON on a Unix socket), its
client, and scheduled snapshots with retention.

    import snapvisor
    from snapvisor.control import Schedule, serve
    from snapvisor.store import KeepPolicy

    vm = snapvisor.VM.boot("guest.elf", mem="256M", name="web1")
    schedule = Schedule(every=900, repos=("s3://backups/web1",), keep=KeepPolicy(last=4, daily=7))
    with serve(vm, api_sock="/run/web1.sock", schedule=schedule) as control:
        vm.wait()
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from snapvisor.control.api import ApiServer, ApiSocketError
from snapvisor.control.client import ApiClient
from snapvisor.control.controller import VmController
from snapvisor.control.errors import ApiUnreachable, ControlError
from snapvisor.control.schedule import Schedule, Scheduler, keep_policy_from_json

if TYPE_CHECKING:
    from snapvisor.machine import VM
    from snapvisor.migrate.tls import Protection
    from snapvisor.store.password import PasswordSource

__all__ = ["ApiClient", "ApiServer", "ApiSocketError", "ApiUnreachable", "ControlError", "Schedule",
           "Scheduler", "VmController", "keep_policy_from_json", "serve"]


@contextmanager
def serve(machine: "VM", *, api_sock: str | Path | None = None,
          schedule: Schedule | None = None,
          log: Callable[[str], None] | None = None,
          protection: "Protection | None" = None,
          password: "PasswordSource | None" = None) -> Iterator[VmController]:
    """Control `machine` for the duration of the block: the API on `api_sock` (if
    given) and the scheduler (always there, so the API can set a schedule later;
    idle without one); `log` hears of failed and recovered snapshots. Everything stops when the block ends; the VM is not
    stopped by leaving it. Migrations asked for through the API use `protection`
    (the process's --tls-* flags; default: plaintext to loopback only): key material
    never comes with a request. `password` opens encrypted repositories (read at
    start: requests never carry one); without it, the environment's source is used."""
    controller = VmController(machine, protection, password)
    scheduler = Scheduler(controller, schedule, log)
    server = ApiServer(api_sock, controller) if api_sock is not None else None
    scheduler.start()
    if server is not None:
        server.start()
    try:
        yield controller
    finally:
        if server is not None:
            server.close()
        scheduler.stop()
        controller.close()
