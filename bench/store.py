#!/usr/bin/env python3
"""Repository benchmark: full, incremental and cloned snapshots of a synthetic guest
image, next to `zstd -1 -T2` and `restic backup` of the same bytes, and S3 writes next
to a raw boto3 upload; an encrypted repository next to an unencrypted one (full
snapshot, eager restore, S3 writes), alternated in the same run. Prints one JSON object.

    flock /tmp/snapvisor-bench.lock python3 bench/store.py [--size-mib 1024] [--no-s3]

The image is about half zero pages, a quarter random pages and a quarter compressible
pages (record-like data), laid out in runs of 64 KiB to 2 MiB as a guest's memory is.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapvisor.store import PAGE_SIZE, Repository, open_backend  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PAIRS = 3  # S3: snapvisor and boto3 runs, alternated


def compressible_pages(npages: int, rng: np.random.Generator) -> np.ndarray:
    """Pages that look like kernel and heap data: 64-byte records holding a pointer to
    the next record, small flags and, in a quarter of them, one of a few common values.
    zstd -1 shrinks them to about 6%, so the non-zero half of the image to about 53%."""
    n = npages * 64
    rec = np.zeros((n, 8), dtype=np.uint64)
    rec[:, 0] = np.arange(n, dtype=np.uint64) * 64 + np.uint64(rng.integers(0, 1 << 40))
    rec[:, 1] = rng.integers(0, 4, n)
    common = rng.integers(0, 1 << 63, 16, dtype=np.uint64)
    sparse = rng.random(n) < 0.25
    rec[sparse, 2] = common[rng.integers(0, 16, int(sparse.sum()))]
    return rec.view(np.uint8).reshape(npages, PAGE_SIZE)


def random_pages(npages: int, rng: np.random.Generator) -> np.ndarray:
    return np.frombuffer(rng.bytes(npages * PAGE_SIZE), np.uint8).reshape(npages, PAGE_SIZE)


def synthetic_image(npages: int, rng: np.random.Generator) -> np.ndarray:
    """Half zero pages, a quarter random, a quarter compressible, in runs of 64 KiB..2 MiB."""
    mem = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    page = 0
    while page < npages:
        run = min(int(rng.integers(16, 513)), npages - page)
        kind = rng.choice(4)  # 0, 1: zero; 2: random; 3: compressible
        if kind == 2:
            mem[page:page + run] = random_pages(run, rng)
        elif kind == 3:
            mem[page:page + run] = compressible_pages(run, rng)
        page += run
    return mem.reshape(-1)


def new_content(count: int, rng: np.random.Generator) -> np.ndarray:
    """Pages the guest rewrote: half random, half compressible."""
    half = count // 2
    return np.concatenate([random_pages(half, rng), compressible_pages(count - half, rng)])


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (all threads)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def snapshot(repo, mem, parent=None, pages=None, vm="vm1"):
    def run():
        with repo.start_snapshot(parent) as w:
            if pages is None:
                w.put_region("ram0", mem.nbytes, mem)
            else:
                view = mem.reshape(-1, PAGE_SIZE)
                w.put_region("ram0", mem.nbytes, view[pages], pages)
            return w.commit(vm), w.stats
    cpu = cpu_seconds()
    (info, stats), seconds = timed(run)
    stats["cpu_seconds"] = round(cpu_seconds() - cpu, 3)
    return info, stats, seconds


BENCH_PASSWORD = "bench password"


def eager_restore(repo, snapshot_id: str, mem, threads: int) -> float:
    """Seconds to read a snapshot's RAM into fresh anonymous memory, as a VMM maps it."""
    reader = repo.get_snapshot(snapshot_id).region_reader("ram0")
    guest = mmap.mmap(-1, mem.nbytes)
    guest.madvise(mmap.MADV_HUGEPAGE)
    target = np.frombuffer(guest, np.uint8)
    _, t = timed(lambda: reader.read_into(target, threads=threads))
    assert np.array_equal(target, mem)
    del target
    guest.close()
    return t


def encryption_cost(mem, work: Path, threads: int, out: dict) -> None:
    """Full snapshot and eager restore into an unencrypted and an encrypted local
    repository, alternated in pairs (medians: this host's timings vary)."""
    times: dict[str, dict[str, list[float]]] = {"plain": {"full": [], "restore": []},
                                                 "encrypted": {"full": [], "restore": []}}
    for run in range(PAIRS):
        for kind in ("plain", "encrypted") if run % 2 == 0 else ("encrypted", "plain"):
            path = work / f"enc-{kind}-{run}"
            repo = Repository.init(open_backend(str(path)), threads=threads,
                                   password=BENCH_PASSWORD if kind == "encrypted" else None)
            info, _, t = snapshot(repo, mem)
            times[kind]["full"].append(t)
            times[kind]["restore"].append(eager_restore(repo, info.id, mem, threads))
            repo.close()
            shutil.rmtree(path, ignore_errors=True)
    med = {kind: {step: float(np.median(v)) for step, v in steps.items()} for kind, steps in times.items()}
    out["encryption_local"] = {
        "pairs": PAIRS,
        **{f"{kind}_{step}_seconds": round(med[kind][step], 3) for kind in med for step in med[kind]},
        "full_ratio_encrypted_to_plain": round(med["encrypted"]["full"] / med["plain"]["full"], 3),
        "restore_ratio_encrypted_to_plain": round(med["encrypted"]["restore"] / med["plain"]["restore"], 3),
        "target": "each ratio at most 1.15",
    }


def peers(image_file: Path, work: Path, out: dict) -> None:
    zst = work / "image.zst"
    cpu = cpu_seconds()
    _, t = timed(lambda: subprocess.run(["zstd", "-1", "-T2", "-q", "-f", str(image_file), "-o",
                                         str(zst)], check=True))
    out["zstd_T2"] = {"seconds": round(t, 3), "cpu_seconds": round(cpu_seconds() - cpu, 3),
                      "bytes": zst.stat().st_size}
    zst.unlink()
    if shutil.which("restic"):
        env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=str(work / "restic"))
        subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
        _, t = timed(lambda: subprocess.run(["restic", "backup", "-q", str(image_file)], env=env,
                                            check=True, capture_output=True))
        out["restic_full"] = {"seconds": round(t, 3), "bytes": dir_size(work / "restic")}


def restic_again(image_file: Path, work: Path, before: int) -> dict:
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=str(work / "restic"))
    _, t = timed(lambda: subprocess.run(["restic", "backup", "-q", str(image_file)], env=env,
                                        check=True, capture_output=True))
    return {"seconds": round(t, 3), "bytes_added": dir_size(work / "restic") - before}


def incremental(repo, mem, parent, changed, rng, label, out):
    view = mem.reshape(-1, PAGE_SIZE)
    view[changed] = new_content(len(changed), rng)
    zstd_size = len(zstandard.ZstdCompressor(level=1).compress(view[changed].tobytes()))
    info, stats, t = snapshot(repo, mem, parent, changed)
    out[label] = {
        "pages_changed": int(len(changed)), "seconds": round(t, 3),
        "cpu_seconds": stats["cpu_seconds"],
        "bytes_written": stats["bytes_written"], "zstd1_of_changed_pages": zstd_size,
        "ratio_to_zstd": round(stats["bytes_written"] / zstd_size, 3),
        "objects_written": stats["objects_written"],
    }
    return info


def s3_bench(mem, image_file: Path, out: dict) -> None:
    import boto3
    import botocore.config

    endpoint = os.environ.get("SNAPVISOR_TEST_S3_ENDPOINT")
    state = None
    if not endpoint:
        state = Path(tempfile.mkdtemp(prefix="snapvisor-bench-s3-"))
        env = dict(os.environ, SNAPVISOR_S3_DIR=str(state))
        env_file = subprocess.run([str(REPO_ROOT / ".ci" / "s3-server"), "start"], env=env,
                                  check=True, capture_output=True, text=True).stdout.split()[-1]
        for line in Path(env_file).read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            os.environ[name] = value
        endpoint = os.environ["SNAPVISOR_TEST_S3_ENDPOINT"]
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              config=botocore.config.Config(s3={"addressing_style": "path"},
                                                            max_pool_connections=16))
        bucket = f"snapvisor-bench-{os.getpid()}"
        client.create_bucket(Bucket=bucket)
        _, t_raw = timed(lambda: client.upload_file(str(image_file), bucket, "raw/image.bin"))
        # Pairs of runs, alternated, medians: the loopback server shares the two
        # cores with the client, and single runs here vary by 2x.
        ours, theirs, encrypted = [], [], []
        for run in range(PAIRS):
            repo = Repository.init(open_backend(f"s3://{bucket}/repo{run}", endpoint_url=endpoint))
            _, stats, t = snapshot(repo, mem)
            ours.append(t)
            sealed = Repository.init(open_backend(f"s3://{bucket}/encrypted{run}", endpoint_url=endpoint),
                                     password=BENCH_PASSWORD)
            encrypted.append(snapshot(sealed, mem)[2])
            packed = stats["bytes_written"]
            tmp = image_file.with_suffix(".packed")
            np.frombuffer(np.random.default_rng(run).bytes(packed), np.uint8).tofile(tmp)
            theirs.append(timed(lambda: client.upload_file(str(tmp), bucket, f"raw/same-bytes-{run}.bin"))[1])
            tmp.unlink()
        t, t_same = float(np.median(ours)), float(np.median(theirs))
        out["s3"] = {
            "endpoint": "SeaweedFS weed mini on loopback",
            "snapvisor_seconds": round(t, 3), "snapvisor_bytes_written": packed,
            "snapvisor_input_GBps": round(mem.nbytes / t / 1e9, 3),
            "snapvisor_upload_MBps": round(packed / t / 1e6, 1),
            "boto3_upload_image_seconds": round(t_raw, 3),
            "boto3_upload_image_GBps": round(mem.nbytes / t_raw / 1e9, 3),
            "boto3_upload_same_bytes_seconds": round(t_same, 3),
            "boto3_upload_same_bytes_MBps": round(packed / t_same / 1e6, 1),
            "ratio_vs_boto3_same_bytes": round(t_same / t, 3),
            "ratio_vs_boto3_same_bytes_per_pair": [round(b / a, 3) for a, b in zip(ours, theirs)],
            "ratio_vs_boto3_image": round(t_raw / t, 3),
            "encrypted_seconds": round(float(np.median(encrypted)), 3),
            "encrypted_ratio_to_plain": round(float(np.median(encrypted)) / t, 3),
            "encrypted_target": "ratio at most 1.1",
        }
    finally:
        if state is not None:
            subprocess.run([str(REPO_ROOT / ".ci" / "s3-server"), "stop"],
                           env=dict(os.environ, SNAPVISOR_S3_DIR=str(state)), check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(2026)
    npages = args.size_mib * 256
    mem = synthetic_image(npages, rng)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="snapvisor-bench-"))
    image_file = work / "image.bin"
    mem.tofile(image_file)
    nonzero = int(mem.reshape(-1, PAGE_SIZE).any(axis=1).sum())
    out = {"image_bytes": mem.nbytes, "nonzero_pages": nonzero, "pages": npages,
           "threads": args.threads, "cpus": os.cpu_count(),
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        if not args.no_peers:
            peers(image_file, work, out)

        repo = Repository.init(open_backend(str(work / "repo")), threads=args.threads)
        info, stats, t = snapshot(repo, mem)
        out["full_local"] = {"seconds": round(t, 3), "cpu_seconds": stats["cpu_seconds"],
                             "input_GBps": round(mem.nbytes / t / 1e9, 3),
                             "bytes_written": stats["bytes_written"],
                             "objects_written": stats["objects_written"]}
        if "zstd_T2" in out:
            out["full_local"]["speed_vs_zstd_T2"] = round(out["zstd_T2"]["seconds"] / t, 3)
        if "restic_full" in out:
            out["full_local"]["speed_vs_restic"] = round(out["restic_full"]["seconds"] / t, 3)

        cpu = cpu_seconds()
        t = eager_restore(repo, info.id, mem, args.threads)
        out["restore_local"] = {"seconds": round(t, 3), "cpu_seconds": round(cpu_seconds() - cpu, 3),
                                "GBps": round(mem.nbytes / t / 1e9, 3),
                                "note": "eager restore into fresh anonymous memory (MADV_HUGEPAGE), "
                                        "every page hash-checked"}
        encryption_cost(mem, work, args.threads, out)

        change = npages // 100
        runs = change // 16
        starts = rng.choice(npages // 16, runs, replace=False) * 16
        clustered = np.sort((starts[:, None] + np.arange(16)).reshape(-1))
        parent = incremental(repo, mem, info.id, clustered, rng,
                             "incremental_1pct_64KiB_runs", out)
        scattered = np.sort(rng.choice(npages, change, replace=False))
        incremental(repo, mem, parent.id, scattered, rng,
                    "incremental_1pct_scattered_pages", out)
        if "restic_full" in out:
            mem.tofile(image_file)
            out["incremental_1pct_scattered_pages"]["restic"] = restic_again(
                image_file, work, out["restic_full"]["bytes"])

        clone_repo = Repository.init(open_backend(str(work / "clones")), threads=args.threads)
        base = synthetic_image(npages, np.random.default_rng(7))
        _, first, _ = snapshot(clone_repo, base, vm="vm-a")
        clone = base.copy()
        clone.reshape(-1, PAGE_SIZE)[rng.choice(npages, npages // 1000, replace=False)] = 0x5A
        _, second, t = snapshot(clone_repo, clone, vm="vm-b")
        out["clone_second_vm"] = {"seconds": round(t, 3), "first_bytes": first["bytes_written"],
                                  "second_bytes": second["bytes_written"],
                                  "ratio": round(second["bytes_written"] / first["bytes_written"], 4)}
        del base, clone

        if not args.no_s3:
            mem.tofile(image_file)
            s3_bench(mem, image_file, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
