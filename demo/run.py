"""`make demo`: vodpush end to end on this machine, without an AWS account.

Starts a local S3 server (moto, a development dependency), creates a demo account whose
uploads go there, starts `vodpush serve` (API and embedded worker, SQLite in .demo/), queues
one upload through the API, waits for it and reads the stored object back from S3. Then it
keeps both servers running and prints what to try next, until Ctrl-C (``--once``: stop after
the object is read back).

Everything lives in .demo/ (made afresh each run) and listens on loopback only.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx

from vodpush.config import Settings
from vodpush.core.accounts import S3Settings
from vodpush.crypto import generate_key
from vodpush.service import Service
from vodpush_client import Client

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BUCKET = "demo-bucket"
USERNAME = "demo"
CDN = 1
FILE = "videos/hello.mp4"
# moto accepts any keys; these are the demo account's, not yours.
S3_KEY, S3_SECRET = "demo-access-key", "demo-secret-key"


def free_port(preferred: int) -> int:
    """``preferred`` when it is free, else one the system picks."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise RuntimeError("no free port")


def wait_for(url: str, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {what} did not start within {seconds:.0f} s") from None
            time.sleep(0.1)


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop once the object is read back")
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo", help="demo data directory")
    parser.add_argument("--port", type=int, default=8080, help="API port (another if busy)")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer  # a development dependency: `make demo` has it

    data = args.dir.resolve()
    shutil.rmtree(data, ignore_errors=True)
    (data / "stores").mkdir(parents=True)

    s3_port = free_port(9000)
    step(f"local S3 server (moto) on http://{HOST}:{s3_port}")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per S3 call
    moto = ThreadedMotoServer(ip_address=HOST, port=s3_port, verbose=False)
    moto.start()
    s3_url = f"http://{HOST}:{s3_port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    )
    s3.create_bucket(Bucket=BUCKET)

    env = {
        **os.environ,
        "VODPUSH_DATABASE_URL": f"sqlite:///{data / 'vodpush.db'}",
        "VODPUSH_SESTORE_ROOT": str(data / "stores"),
        "VODPUSH_SECRET_KEY": generate_key(),
        "VODPUSH_HOST": HOST,
        "VODPUSH_PORT": str(free_port(args.port)),
    }
    settings = Settings(
        database_url=env["VODPUSH_DATABASE_URL"],
        sestore_root=Path(env["VODPUSH_SESTORE_ROOT"]),
        secret_key=env["VODPUSH_SECRET_KEY"],
    )
    step(f"demo account {USERNAME!r} (cdn {CDN}) uploading to {s3_url}, bucket {BUCKET!r}")
    service = Service.open(settings)
    try:
        created = service.accounts.create(
            cdn=CDN,
            username=USERNAME,
            s3=S3Settings(
                endpoint_url=s3_url,
                region="us-east-1",
                access_key_id=S3_KEY,
                secret_access_key=S3_SECRET,
            ),
        )
        service.accounts.allow_buckets(created["api_key"], [BUCKET])
    finally:
        service.close()
    source = data / "stores" / "sestore1" / USERNAME / FILE
    source.parent.mkdir(parents=True)
    source.write_bytes(os.urandom(256 * 1024))

    api = f"http://{HOST}:{env['VODPUSH_PORT']}"
    step(f"vodpush serve on {api} (API and worker, SQLite in {data})")
    log = open(data / "serve.log", "wb")  # noqa: SIM115 - open as long as the server runs
    server = subprocess.Popen(
        [sys.executable, "-m", "vodpush", "serve"], env=env, stdout=log, stderr=log
    )
    try:
        wait_for(api + "/healthz", "vodpush serve")
        path = f"sestore1/{USERNAME}/{FILE}"
        with Client(api + "/stable/", CDN, created["api_key"], created["api_secret"]) as client:
            request_id = client.upload(path, "hello.mp4", bucket=BUCKET, acl="private")
            step(f"aws.upload queued request {request_id}: {path} -> s3://{BUCKET}/hello.mp4")
            deadline = time.monotonic() + 60
            while not (record := client.get(request_id)).finished:
                if time.monotonic() > deadline:
                    raise SystemExit(f"demo: request {request_id} still {record.state} after 60 s")
                time.sleep(0.2)
        if not record.succeeded:
            raise SystemExit(f"demo: the upload failed: {record.message} (see {log.name})")
        head = s3.head_object(Bucket=BUCKET, Key="hello.mp4")
        step(
            f"aws.status says {record.message!r}; S3 has s3://{BUCKET}/hello.mp4, "
            f"{head['ContentLength']} bytes, {head['ContentType']}"
        )
        if args.once:
            return 0
        print(
            f"""
The demo keeps running until Ctrl-C. In another shell, try:

  export VODPUSH_URL={api}/stable/ VODPUSH_CDN={CDN}
  export VODPUSH_API_KEY={created["api_key"]}
  export VODPUSH_API_SECRET={created["api_secret"]}
  .venv/bin/vodpush client upload {path} copy.mp4 --bucket {BUCKET} --acl public-read --wait
  .venv/bin/vodpush client status

The server's log is {log.name}.""",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        moto.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: both servers go down
    sys.exit(main())
