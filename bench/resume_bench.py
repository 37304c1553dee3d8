"""What recognising an already-stored object costs, against sending the file again.

A multipart upload of --mib MiB (random bytes, in a temp sestore) to a moto server process on
127.0.0.1, then the same upload run again from its checkpoint, as a worker does after one
was killed between CompleteMultipartUpload and recording success: the time, the CPU time of
this process and the bytes read from the file, each way, for checksums on and off. Then a
single PUT of 4 MiB sent again (a retry before this change) against the HeadObject that
claims it now, and the cost of the final source check (fstat, and the name opened again).

    .venv/bin/python bench/resume_bench.py --mib 256
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from vodpush import sestore
from vodpush.core.checkpoint import MemoryLedger
from vodpush.transfer import ObjectOptions, UploadJob, upload
from vodpush.transfer.s3client import make_s3_client
from vodpush.transfer.source import SourceFile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.s3server import MotoServer  # the tests' moto process helper

MiB = 1024 * 1024
TUNING = {"threshold": 8 * MiB, "chunksize": 8 * MiB, "concurrency": 4}


class CountingSource(SourceFile):
    """Counts the bytes read from the file."""

    read = 0

    def read_at(self, offset: int, length: int) -> bytes:
        CountingSource.read += length
        return super().read_at(offset, length)


def timed(run: functools.partial) -> tuple[float, float, int, object]:
    CountingSource.read = 0
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return time.perf_counter() - wall, time.process_time() - cpu, CountingSource.read, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the multipart file")
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    import vodpush.transfer.engine as engine

    engine.SourceFile = CountingSource  # type: ignore[misc]  # count what upload() reads
    work = Path(tempfile.mkdtemp(prefix="vodpush-resume-bench-"))
    try:
        home = work / "sestore1" / "bench"
        home.mkdir(parents=True)
        with open(home / "big.mp4", "wb") as fh:
            for _ in range(args.mib // 8):
                fh.write(os.urandom(8 * MiB))
        (home / "small.mp4").write_bytes(os.urandom(4 * MiB))

        def opener(name: str) -> functools.partial:
            return functools.partial(sestore.open_source, work, f"sestore1/bench/{name}", "bench")

        with MotoServer(log_dir=work) as server:
            for checksums in (True, False):
                client = make_s3_client(server.settings(checksums=checksums))
                bucket = f"resume-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=bucket)
                client.put_bucket_versioning(
                    Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
                )
                job = UploadJob(
                    source=opener("big.mp4"),
                    bucket=bucket,
                    key="big.mp4",
                    options=ObjectOptions(checksums=checksums),
                )
                ledger = MemoryLedger()
                sent = timed(functools.partial(upload, client, job, ledger, **TUNING))
                found = timed(functools.partial(upload, client, job, ledger, **TUNING))
                versions = client.list_object_versions(Bucket=bucket)["Versions"]
                print(
                    f"checksums {'on ' if checksums else 'off'} {args.mib} MiB: "
                    f"upload {sent[0]:.2f} s ({sent[1]:.2f} s CPU, {sent[2] / MiB:.0f} MiB read)"
                    f" | claimed after a kill {found[0]:.2f} s ({found[1]:.2f} s CPU, "
                    f"{found[2] / MiB:.0f} MiB read, {found[3].parts_sent} parts sent), "
                    f"{len(versions)} object version"
                )
            client = make_s3_client(server.settings())
            bucket = f"resume-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)

            def single(may_exist: bool) -> float:
                job = UploadJob(
                    source=opener("small.mp4"), bucket=bucket, key="s.mp4", may_exist=may_exist
                )
                runs = [timed(functools.partial(upload, client, job, MemoryLedger(), **TUNING))]
                runs += [timed(functools.partial(upload, client, job, MemoryLedger(), **TUNING))
                         for _ in range(14)]  # fmt: skip
                return statistics.median(run[0] for run in runs)

            again, claimed = single(False), single(True)
            print(
                f"single PUT of 4 MiB on a retry: sent again {again * 1000:.0f} ms, "
                f"claimed by HeadObject {claimed * 1000:.0f} ms (median of 15)"
            )
        source = SourceFile(opener("small.mp4"))
        try:
            n = 2000
            start = time.perf_counter()
            for _ in range(n):
                source.file.changed()
            fstat_only = (time.perf_counter() - start) / n
            start = time.perf_counter()
            for _ in range(n):
                source.check_unchanged()
            full = (time.perf_counter() - start) / n
        finally:
            source.close()
        print(
            f"final source check per upload: fstat {fstat_only * 1e6:.0f} us, "
            f"with the name opened again {full * 1e6:.0f} us"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
