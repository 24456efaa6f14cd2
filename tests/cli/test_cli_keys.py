"""`snapvisor init` and `snapvisor key ...` as an operator runs them (subprocesses,
real repositories on disk): encrypted by default, passwords only from files,
commands or the terminal, clear errors that change nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli_helpers import snapvisor

PASSWORD = "operator password"
NO_ENV = {"SNAPVISOR_PASSWORD_FILE": "", "SNAPVISOR_PASSWORD_COMMAND": ""}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in (("pw", PASSWORD), ("pw2", "second password"), ("pw3", "third password")):
        (tmp_path / name).write_text(text + "\n")
        out[name] = str(tmp_path / name)
    out["repo"] = str(tmp_path / "repo")
    return out


def test_init_needs_a_password_or_the_insecure_flag(files) -> None:
    done = snapvisor("init", "--repo", files["repo"], env=NO_ENV)
    assert done.returncode == 2 and "--insecure-no-encryption" in done.stderr and "--password-file" in done.stderr
    assert not Path(files["repo"]).exists() or not any(Path(files["repo"]).iterdir())
    done = snapvisor("init", "--repo", files["repo"], "--insecure-no-encryption", env=NO_ENV)
    assert done.returncode == 0 and "UNENCRYPTED" in done.stdout
    done = snapvisor("key", "list", "--repo", files["repo"], env=NO_ENV)
    assert done.returncode == 1 and "is not encrypted" in done.stderr


def test_init_then_every_key_verb(files) -> None:
    repo, pw, pw2, pw3 = files["repo"], files["pw"], files["pw2"], files["pw3"]
    done = snapvisor("init", "--repo", repo, "--password-file", pw, env=NO_ENV)
    assert done.returncode == 0 and "created encrypted repository" in done.stdout, done.stderr
    assert PASSWORD not in done.stdout + done.stderr

    done = snapvisor("ls", "--repo", repo, env=NO_ENV)
    assert done.returncode == 1 and "is encrypted and no password was given" in done.stderr
    done = snapvisor("ls", "--repo", repo, "--password-file", pw2, env=NO_ENV)
    assert done.returncode == 1 and "no key in" in done.stderr and "opens with this password" in done.stderr
    done = snapvisor("ls", "--repo", repo, env={"SNAPVISOR_PASSWORD_COMMAND": f"cat {pw}"})
    assert done.returncode == 0 and "0 snapshots" in done.stdout, done.stderr

    done = snapvisor("key", "add", "--repo", repo, "--password-file", pw, "--new-password-file", pw2, env=NO_ENV)
    assert done.returncode == 0 and "added key" in done.stdout, done.stderr
    done = snapvisor("key", "list", "--repo", repo, "--json", env={"SNAPVISOR_PASSWORD_FILE": pw2})
    keys = json.loads(done.stdout)
    assert len(keys) == 2 and [k["current"] for k in keys].count(True) == 1, keys
    first = next(k["id"] for k in keys if not k["current"])

    done = snapvisor("key", "remove", first[:8], "--repo", repo, "--password-file", pw, env=NO_ENV)
    assert done.returncode == 1 and "opened the repository with" in done.stderr
    done = snapvisor("key", "remove", first[:8], "--repo", repo, "--password-file", pw2, env=NO_ENV)
    assert done.returncode == 0 and f"removed key {first[:8]}" in done.stdout, done.stderr

    done = snapvisor("key", "passwd", "--repo", repo, "--password-file", pw2, "--new-password-file", pw3,
                     env=NO_ENV)
    assert done.returncode == 0 and "replaced key" in done.stdout, done.stderr
    for old in (pw, pw2):
        assert snapvisor("ls", "--repo", repo, "--password-file", old, env=NO_ENV).returncode == 1
    done = snapvisor("key", "list", "--repo", repo, "--password-file", pw3, env=NO_ENV)
    assert done.returncode == 0 and done.stdout.count("\n") == 2, done.stdout  # header and the one key
    done = snapvisor("key", "add", "--repo", repo, "--password-file", pw3, env=NO_ENV)
    assert done.returncode == 2 and "--new-password-file" in done.stderr


def test_password_is_not_accepted_on_the_command_line(files) -> None:
    for flag in ("--password", "--pass", "--passw"):
        done = snapvisor("init", "--repo", files["repo"], flag, PASSWORD, env=NO_ENV)
        assert done.returncode == 2 and re.search("never given on the command line|ambiguous", done.stderr)
        assert PASSWORD not in done.stderr + done.stdout
    assert not Path(files["repo"]).exists()
