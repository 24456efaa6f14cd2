"""`snapvisor copy` as in the 3-2-1 recipe: a local unencrypted repository copied
into an encrypted one on the S3 server; run again, it copies nothing."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import s3_env, snapvisor
from snapvisor.store import PAGE_SIZE, Repository

pytestmark = pytest.mark.s3


def test_copy_local_to_encrypted_s3(tmp_path: Path, s3_server, s3_bucket: str) -> None:
    local = str(tmp_path / "local")
    rng = np.random.default_rng(5)
    with Repository.open_url(local, create=True) as repo:
        for vm in ("web1", "web1", "db1"):
            memory = rng.integers(0, 255, size=32 * PAGE_SIZE, dtype=np.uint8)
            with repo.start_snapshot() as writer:
                writer.put_region("ram0", memory.size, memory)
                writer.commit(vm)
    password = tmp_path / "password"
    password.write_text("off-site\n")
    env = {**s3_env(s3_server), "SNAPVISOR_PASSWORD_FILE": str(password), "SNAPVISOR_PASSWORD_COMMAND": ""}
    remote = f"s3://{s3_bucket}/copy-{secrets.token_hex(3)}"
    done = snapvisor("copy", "--from-repo", local, "--repo", remote, env=env)
    assert done.returncode == 1 and "snapvisor init" in done.stderr, done.stderr  # it must exist
    assert snapvisor("init", "--repo", remote, env=env).returncode == 0

    done = snapvisor("copy", "--from-repo", local, "--repo", remote, "--vm", "web1", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["copied"]) == 2
    done = snapvisor("copy", "--from-repo", local, "--repo", remote, env=env)
    assert done.returncode == 0 and "1 copied, 2 already there" in done.stdout, done.stdout + done.stderr
    listed = json.loads(snapvisor("ls", "--repo", remote, "--json", env=env).stdout)
    assert sorted(s["vm"] for s in listed) == ["db1", "web1", "web1"]
    verify = snapvisor("verify", "--read-data", "--repo", remote, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
