"""Where the password of an encrypted repository comes from.

The ways restic users know: a file (`--password-file`, `SNAPVISOR_PASSWORD_FILE`) or
the output of a command (`SNAPVISOR_PASSWORD_COMMAND`, e.g. `pass show backup`).
Never the command line itself: argv is visible to every user of the host and ends
up in logs. A source is read when a repository needs it; its repr names where it
reads from, never what it read.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field

from snapvisor.store.errors import PasswordNeeded, RepositoryError

ENV_FILE = "SNAPVISOR_PASSWORD_FILE"
ENV_COMMAND = "SNAPVISOR_PASSWORD_COMMAND"
COMMAND_TIMEOUT_S = 60.0
WAYS = (f"--password-file FILE, {ENV_FILE}=FILE, or {ENV_COMMAND}='a command that prints "
        f"it' (e.g. 'pass show snapvisor')")


class PasswordSourceError(RepositoryError):
    """The password file cannot be read, or the password command failed."""


@dataclass(frozen=True)
class PasswordSource:
    kind: str    # "file", "command", "terminal" (asked when needed) or "given" (by a program)
    where: str   # the file or the command; "" for a given value
    value: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def file(cls, path: str | os.PathLike) -> "PasswordSource":
        return cls("file", os.path.abspath(os.fspath(path)))

    @classmethod
    def command(cls, command: str) -> "PasswordSource":
        return cls("command", command)

    @classmethod
    def terminal(cls) -> "PasswordSource":
        return cls("terminal", "")

    @classmethod
    def given(cls, password: str | bytes) -> "PasswordSource":
        value = password.encode() if isinstance(password, str) else bytes(password)
        return cls("given", "", value)

    @classmethod
    def from_environment(cls, prefix: str = "SNAPVISOR_") -> "PasswordSource | None":
        """The source named by SNAPVISOR_PASSWORD_FILE or SNAPVISOR_PASSWORD_COMMAND
        (with another `prefix`: SNAPVISOR_FROM_PASSWORD_..., the source repository's
        of `snapvisor copy`)."""
        file_var, command_var = f"{prefix}PASSWORD_FILE", f"{prefix}PASSWORD_COMMAND"
        path, command = os.environ.get(file_var), os.environ.get(command_var)
        if path and command:
            raise PasswordSourceError(f"both {file_var} and {command_var} are set; unset one")
        if path:
            return cls.file(path)
        if command:
            return cls.command(command)
        return None

    def describe(self) -> str:
        if self.kind == "given" and self.where:  # resolved(): where it was read from
            return f"{self.where} (read at start)"
        return {"file": f"password file {self.where}", "command": f"password command {self.where!r}",
                "given": "password given by the caller", "terminal": "password typed"}[self.kind]

    def read(self) -> bytes:
        """The password (one trailing newline dropped); a clear error when the source fails."""
        if self.kind == "given":
            value = self.value
        elif self.kind == "file":
            try:
                with open(self.where, "rb") as f:
                    value = f.read(1 << 16)
            except OSError as e:
                raise PasswordSourceError(f"cannot read the {self.describe()}: {e.strerror}") from None
        elif self.kind == "terminal":
            import getpass

            value = getpass.getpass("repository password: ").encode()
        else:
            value = self._run_command()
        if value.endswith(b"\n"):
            value = value[:-1]
            if value.endswith(b"\r"):
                value = value[:-1]
        if not value:
            raise PasswordSourceError(f"the {self.describe()} gives an empty password")
        return value

    def resolved(self) -> "PasswordSource":
        """The password read now, kept (a long-running process reads its source at start)."""
        return self if self.kind == "given" else PasswordSource("given", self.describe(), self.read())

    def _run_command(self) -> bytes:
        try:
            argv = shlex.split(self.where)
        except ValueError as e:
            raise PasswordSourceError(f"cannot parse the {self.describe()}: {e}") from None
        if not argv:
            raise PasswordSourceError(f"{ENV_COMMAND} is empty")
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PasswordSourceError(f"the {self.describe()} did not run: {e}") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise PasswordSourceError(f"the {self.describe()} failed with exit status {done.returncode}"
                                      f"{': ' + err[-1] if err else ''}")
        return done.stdout


def password_needed(url: str) -> PasswordNeeded:
    return PasswordNeeded(f"the repository at {url} is encrypted and no password was given: "
                          f"give it with {WAYS}")
