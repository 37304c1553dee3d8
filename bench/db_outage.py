"""A PostgreSQL outage of N seconds under a worker process in the middle of a multipart
upload: a throwaway PostgreSQL cluster of its own (never the shared server) and the moto S3
process, as tests/test_db_faults.py builds them. Prints the request's outcome, what the
bucket holds, how many log lines the worker wrote during the outage and how long after the
server came back the upload was done.

    .venv/bin/python bench/db_outage.py --seconds 60        # as root or as a normal user
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # no credential lookups beyond loopback

from tests.conftest import MiB, s3_client
from tests.s3server import MotoServer
from tests.test_db_faults import Bucket, Cluster, _pg_bindir, parts_stored, request_rows
from tests.test_faults import queue_file, start_worker, worker_env

from vodpush.config import Settings
from vodpush.crypto import generate_key
from vodpush.service import Service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long the server is down")
    parser.add_argument("--lease", type=int, default=60, help="VODPUSH_LEASE_SECONDS")
    parser.add_argument("--mib", type=int, default=60, help="size of the uploaded file")
    args = parser.parse_args()
    bindir = _pg_bindir()
    if bindir is None:
        print("PostgreSQL server binaries (initdb, pg_ctl) not found", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="vodpush-outage-"))
    root = work / "stores"
    (root / "sestore1").mkdir(parents=True)
    moto = MotoServer(log_dir=work).start()
    cluster = Cluster(bindir)
    try:
        cluster.init()
        service = Service.open(
            Settings(database_url=cluster.url, sestore_root=root, secret_key=generate_key())
        )
        created = service.accounts.create(cdn=1, username="o", s3=moto.settings())
        s3_client(moto).create_bucket(Bucket="outage-bucket")
        store = Bucket(moto, "outage-bucket")

        class Account:
            id = created["id"]
            cdn = 1
            username = "o"

        rid, _ = queue_file(service, Account, root, "o.mp4", args.mib * MiB, "outage-bucket")
        log = work / "worker.log"
        env = worker_env(
            service, VODPUSH_LEASE_SECONDS=str(args.lease), VODPUSH_PART_CONCURRENCY="2"
        )
        worker = start_worker(env, log, "--burst")
        while parts_stored(service, rid) < 2:
            time.sleep(0.05)
        cluster.stop("fast")
        down = time.monotonic()
        lines_before = len(log.read_text().splitlines())
        while time.monotonic() - down < args.seconds:
            if worker.poll() is not None:
                print("the worker died during the outage", file=sys.stderr)
                return 1
            time.sleep(0.5)
        during = len(log.read_text().splitlines()) - lines_before
        cluster.start()
        up = time.monotonic()
        code = worker.wait(600)
        done = time.monotonic() - up
        (row,) = request_rows(service)
        versions, uploads = store.counts()
        print(
            json.dumps(
                {
                    "outage_seconds": args.seconds,
                    "lease_seconds": args.lease,
                    "worker_exit": code,
                    "state": row.state,
                    "message": row.message,
                    "attempts": row.attempts,
                    "lease_expiries": row.lease_expiries,
                    "object_versions": versions,
                    "multipart_uploads_left": uploads,
                    "log_lines_during_outage": during,
                    "done_seconds_after_database_back": round(done, 1),
                    "worker_log": str(log),
                }
            )
        )
        service.close()
        return 0 if row.state == "succeeded" and (versions, uploads) == (1, 0) else 1
    finally:
        cluster.destroy()
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
