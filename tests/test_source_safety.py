"""A customer controls every file and symlink below sestore<N>/<username>/ (SFTP, rsync)
and tries to get bytes from outside that directory into their bucket: symlinks at every
level, special files, malformed paths, and a file swapped for a symlink in a tight loop
while uploads run. Over HTTP against a live server, a real worker, moto's S3 server
process, on SQLite and PostgreSQL; and the opener and uploader directly."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import s3_client
from tests.wire import call
from vodpush import sestore
from vodpush.core.checkpoint import MemoryLedger
from vodpush.sestore import PathRefused
from vodpush.transfer import (
    UploadError,
    UploadInterrupted,
    UploadJob,
    upload,
)
from vodpush.transfer.s3client import make_s3_client
from vodpush.worker.runner import Worker

MiB = 1024 * 1024
SIZE = 4096
# The same length for every file: a leak cannot be told by its size.
INSIDE = (b"INSIDE-the-customer's-own-bytes|" * 200)[:SIZE]
OTHER_MARK = b"OUTSIDE-MARK-another-user-"
FAR_MARK = b"OUTSIDE-MARK-beyond-the-sestore-"
MARKS = (OTHER_MARK, FAR_MARK, b"OUTSIDE-MARK")


def secret(mark: bytes) -> bytes:
    return (mark * (SIZE // len(mark) + 1))[:SIZE]


@pytest.fixture
def follow_symlinks() -> bool:
    return True


@pytest.fixture
def settings(settings: Any, follow_symlinks: bool) -> Any:
    # Quick retries, so that requests caught by a changing file settle within the test.
    return settings.model_copy(
        update={
            "max_attempts": 8,
            "retry_base_delay": 0.05,
            "retry_max_delay": 0.3,
            "sestore_follow_symlinks": follow_symlinks,
            "rate_limit": 0,  # the race submits as fast as it can, from one account
        }
    )


@dataclass
class Tree:
    root: Path  # sestore_root
    jb: Path  # the customer's own directory
    other: Path  # another customer's directory, with secret.mp4
    far: Path  # a directory outside the sestore, with secret.mp4

    def fill(self, path: str, data: bytes = INSIDE) -> Path:
        target = self.jb / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def target(self, template: str) -> str:
        return template.format(jb=self.jb, other=self.other, far=self.far, root=self.root)


@pytest.fixture
def tree(account: Any, make_account: Any, sestore_root: Path, tmp_path: Path) -> Tree:
    make_account(cdn=159, username="other")
    jb = sestore_root / "sestore1" / "jb"
    other = sestore_root / "sestore1" / "other"
    far = tmp_path / "outside"
    far.mkdir()
    (other / "secret.mp4").write_bytes(secret(OTHER_MARK))
    (far / "secret.mp4").write_bytes(secret(FAR_MARK))
    t = Tree(root=sestore_root, jb=jb, other=other, far=far)
    t.fill("videos/clip.mp4")
    return t


def submit(server: Any, creds: Any, path: str, bucket: str, key: str | None = None) -> dict:
    return call(
        server.url,
        creds,
        "aws.upload",
        path=path,
        destination_path=key or f"k/{uuid.uuid4().hex}.mp4",
        bucket=bucket,
        acl="private",
    )


def records(server: Any, creds: Any) -> dict[int, dict]:
    """Every request of the account, by id, as aws.status shows them."""
    found: dict[int, dict] = {}
    while True:
        answer = call(server.url, creds, "aws.status", limit=1000, offset=len(found))
        assert answer["status"] == "success", answer
        found |= {r["id"]: r for r in answer["data"]}
        if len(answer["data"]) < 1000:
            return found


def run_worker(service: Any, timeout: float = 60) -> float:
    """Drain the queue in burst mode; the time it took (the test fails if it hangs)."""
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    started = time.monotonic()
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop(grace=0)
        thread.join(10)
        pytest.fail("worker did not drain the queue in time")
    return time.monotonic() - started


def bucket_objects(server: Any, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, read back."""
    client = s3_client(server)
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            key = item["Key"]
            objects[key] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return objects


def assert_nothing_from_outside(objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        assert not any(mark in data for mark in MARKS), f"{key} holds bytes from outside"
        assert data == INSIDE, f"{key} holds something else than the customer's file"


# -- symlinks at every level -------------------------------------------------------------

# (path below jb/, the component the customer replaces with a symlink, its target, what the
# refusal says). {jb}, {other}, {far}, {root} are absolute paths.
ESCAPES = [
    ("to-far.mp4", "to-far.mp4", "{far}/secret.mp4", "outside"),
    ("to-other.mp4", "to-other.mp4", "../other/secret.mp4", "outside"),
    ("to-other-abs.mp4", "to-other-abs.mp4", "{other}/secret.mp4", "outside"),
    ("fardir/secret.mp4", "fardir", "{far}", "outside"),
    ("theirs/secret.mp4", "theirs", "../other", "outside"),
    ("theirs-abs/secret.mp4", "theirs-abs", "{other}", "outside"),
    ("up/other/secret.mp4", "up", "..", "outside"),
    ("videos/deep/secret.mp4", "videos/deep", "../../other", "outside"),
    ("chain1.mp4", "chain1.mp4", "chain2.mp4", "outside"),  # chain2.mp4 leads out
    # Leaves the directory and comes back: refused (a link may not climb above it).
    ("roundtrip.mp4", "roundtrip.mp4", "../jb/videos/clip.mp4", "outside"),
    ("abs-dotdot.mp4", "abs-dotdot.mp4", "{jb}/../other/secret.mp4", "outside"),
    ("etc.mp4", "etc.mp4", "/etc/hostname", "outside"),
    ("proc.mp4", "proc.mp4", "/proc/self/root{far}/secret.mp4", "outside"),
    ("fd.mp4", "fd.mp4", "/proc/self/fd/0", "outside"),
    ("zero.mp4", "zero.mp4", "/dev/zero", "outside"),
    ("loop.mp4", "loop.mp4", "loop.mp4", "too many levels of symbolic links"),
    ("ping.mp4", "ping.mp4", "pong.mp4", "too many levels of symbolic links"),
    ("to-dir.mp4", "to-dir.mp4", "videos", "not a regular file"),
    ("dangling.mp4", "dangling.mp4", "nothing-here.mp4", "no such file"),
    ("filedir/x.mp4", "filedir", "videos/clip.mp4", "not a directory"),
]

# Symlinks that stay inside the customer's directory: followed (by default).
INSIDE_LINKS = {
    "rel.mp4": "videos/clip.mp4",
    "abs.mp4": "{jb}/videos/clip.mp4",
    "vids": "videos",
    "videos/sibling.mp4": "../videos/clip.mp4",
    "videos/dotty.mp4": "./../videos/./clip.mp4",
    "chain.mp4": "rel.mp4",
    "absdir": "{jb}/videos/",
}
INSIDE_PATHS = [
    "rel.mp4",
    "abs.mp4",
    "vids/clip.mp4",
    "videos/sibling.mp4",
    "videos/dotty.mp4",
    "chain.mp4",
    "absdir/clip.mp4",
]


def make_inside_links(tree: Tree) -> None:
    for name, target in INSIDE_LINKS.items():
        (tree.jb / name).symlink_to(tree.target(target))
    # The operator's own symlinks above the customer's directory are followed: a second
    # store whose user directory is a symlink to the first one's.
    (tree.root / "sestore2" / "jb").symlink_to(tree.jb)


def swap_in_link(tree: Tree, component: str, target: str) -> None:
    """What the customer does after the submit: the real file or directory at ``component``
    is moved away (atomically replaced by the symlink)."""
    place = tree.jb / component
    link = place.with_name(f".link-{uuid.uuid4().hex}")
    link.symlink_to(tree.target(target))
    if place.is_dir() and not place.is_symlink():
        place.rename(place.with_name(f".moved-{uuid.uuid4().hex}"))
    os.replace(link, place)


def test_symlinks_leading_out_are_refused_at_submit_and_at_the_worker(
    live_server: Any, service: Any, s3_account: Any, s3: Any, bucket: str, tree: Tree
) -> None:
    (tree.jb / "pong.mp4").symlink_to("ping.mp4")
    (tree.jb / "chain2.mp4").symlink_to("../other/secret.mp4")
    # 1. While every path is an ordinary file of the customer's, each is queued.
    queued = {}
    for path, component, _, _ in ESCAPES:
        tree.fill(path)
        answer = submit(live_server, s3_account, f"sestore1/jb/{path}", bucket)
        assert answer["status"] == "success", (path, answer)
        queued[path] = answer["data"]["id"]
    # 2. The customer then swaps a symlink in, at the file or at a directory on the way.
    for path, component, target, _ in ESCAPES:
        swap_in_link(tree, component, target)
    # 3. Submitting again is refused, naming the path and why.
    for path, _, _, why in ESCAPES:
        answer = submit(live_server, s3_account, f"sestore1/jb/{path}", bucket)
        assert answer["status"] == "failure", (path, answer)
        assert answer["code"] == "0007", (path, answer)
        assert answer["message"].startswith("invalid path: "), (path, answer)
        assert why in answer["message"], (path, answer)
        assert "Traceback" not in answer["message"]
    # 4. The worker opens what is there now, and refuses the same way.
    run_worker(service)
    status = records(live_server, s3_account)
    for path, _, _, why in ESCAPES:
        record = status[queued[path]]
        assert record["state"] == "failed", (path, record)
        assert record["message"].startswith("Upload failed: source file unavailable: "), record
        assert why in record["message"], (path, record)
        assert record["attempts"] == 1, (path, record)  # refused for good, not retried
    assert bucket_objects(s3, bucket) == {}


def test_symlinks_inside_the_directory_are_followed(
    live_server: Any, service: Any, s3_account: Any, s3: Any, bucket: str, tree: Tree
) -> None:
    make_inside_links(tree)
    paths = [f"sestore1/jb/{p}" for p in INSIDE_PATHS] + [
        "sestore2/jb/videos/clip.mp4",  # through the operator's symlinked user directory
        "sestore2/jb/abs.mp4",  # an absolute link naming the real directory, from sestore2
        "sestore2/jb/rel.mp4",
    ]
    ids = {}
    for path in paths:
        answer = submit(live_server, s3_account, path, bucket, key=path)
        assert answer["status"] == "success", (path, answer)
        ids[path] = answer["data"]["id"]
    run_worker(service)
    status = records(live_server, s3_account)
    for path, request_id in ids.items():
        assert status[request_id]["state"] == "succeeded", (path, status[request_id])
    objects = bucket_objects(s3, bucket)
    assert sorted(objects) == sorted(paths)
    assert_nothing_from_outside(objects)


@pytest.mark.parametrize("follow_symlinks", [False])
def test_no_symlink_is_followed_when_disabled(
    live_server: Any, service: Any, s3_account: Any, s3: Any, bucket: str, tree: Tree
) -> None:
    make_inside_links(tree)
    for path in INSIDE_PATHS:
        answer = submit(live_server, s3_account, f"sestore1/jb/{path}", bucket)
        assert answer["code"] == "0007", (path, answer)
        assert "is a symbolic link, which this server does not follow" in answer["message"]
    # The operator's symlinks above the user directory still are.
    plain = submit(live_server, s3_account, "sestore2/jb/videos/clip.mp4", bucket, key="plain")
    assert plain["status"] == "success", plain
    # A file swapped for an inside symlink after the submit is refused by the worker too.
    tree.fill("later.mp4")
    later = submit(live_server, s3_account, "sestore1/jb/later.mp4", bucket, key="later")
    assert later["status"] == "success", later
    swap_in_link(tree, "later.mp4", "videos/clip.mp4")
    run_worker(service)
    status = records(live_server, s3_account)
    assert status[plain["data"]["id"]]["state"] == "succeeded"
    refused = status[later["data"]["id"]]
    assert refused["state"] == "failed"
    assert "'later.mp4' is a symbolic link" in refused["message"]
    assert sorted(bucket_objects(s3, bucket)) == ["plain"]


# -- special files ------------------------------------------------------------------------


def make_special(tree: Tree, name: str, kind: str) -> None:
    """A special file of ``kind`` at jb/``name``, replacing what is there atomically."""
    place = tree.jb / name
    staged = tree.jb / f".staged-{uuid.uuid4().hex[:8]}"
    if kind == "fifo":
        os.mkfifo(staged)
    elif kind == "socket":
        # AF_UNIX paths are short: bind in a short directory, then move it in.
        short = Path(tempfile.mkdtemp(dir="/tmp", prefix="vp"))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(short / "s"))
        sock.close()
        os.rename(short / "s", staged)
        short.rmdir()
    elif kind == "device":
        os.mknod(staged, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    elif kind == "directory":
        staged.mkdir()
    if kind == "directory":
        if place.exists():
            place.unlink()
        staged.rename(place)
    else:
        os.replace(staged, place)


SPECIALS = [
    ("fifo", "a FIFO"),
    ("socket", "a socket"),
    ("device", "a character device"),
    ("directory", "a directory"),
]


def test_special_files_are_refused_quickly_at_submit_and_at_the_worker(
    live_server: Any, service: Any, s3_account: Any, s3: Any, bucket: str, tree: Tree
) -> None:
    # At submit: refused at once (a FIFO nobody writes to must not block the API).
    for kind, why in SPECIALS:
        make_special(tree, f"{kind}-now.mp4", kind)
        started = time.monotonic()
        answer = submit(live_server, s3_account, f"sestore1/jb/{kind}-now.mp4", bucket)
        assert time.monotonic() - started < 5
        assert answer["code"] == "0007", (kind, answer)
        assert "not a regular file" in answer["message"] and why in answer["message"], answer
    # At the worker: a regular file at submit, swapped for the special file afterwards.
    queued = {}
    for kind, _ in SPECIALS:
        tree.fill(f"{kind}-later.mp4")
        answer = submit(live_server, s3_account, f"sestore1/jb/{kind}-later.mp4", bucket)
        assert answer["status"] == "success", answer
        queued[kind] = answer["data"]["id"]
        make_special(tree, f"{kind}-later.mp4", kind)
    # A worker blocked on a FIFO would never drain: the timeout is the assertion.
    assert run_worker(service, timeout=30) < 30
    status = records(live_server, s3_account)
    for kind, why in SPECIALS:
        record = status[queued[kind]]
        assert record["state"] == "failed", record
        assert "source file unavailable: not a regular file" in record["message"], record
        assert why in record["message"], record
    assert bucket_objects(s3, bucket) == {}


# -- malformed paths ----------------------------------------------------------------------

MALFORMED = [
    ("sestore1/jb/videos/clip.mp4\x00.txt", "NUL"),
    ("sestore1/jb/\ud800.mp4", "lone surrogate"),
    ("sestore1/jb/\udcff.mp4", "lone surrogate"),  # surrogateescape would make it byte 0xff
    ("sestore1/jb/" + "x" * 300 + ".mp4", "longer than 255 bytes"),
    ("sestore1/jb/" + "é" * 130 + ".mp4", "longer than 255 bytes"),  # 260 bytes, 134 chars
    ("sestore1/jb/" + "a/" * 5000 + "x.mp4", "at most 4096 characters"),
    ("sestore1/jb/" + "a/" * 100 + "x.mp4", "more than 64 components"),
    ("sestore1/jb/" + "é" * 2100, "longer than 4096 bytes"),
    ("sestore1\n/jb/videos/clip.mp4", "must start with sestore<N>/"),
    ("sestore1/jb/videos/clip.mp4\n", "no such file"),
    ("sestore0001234567/jb/videos/clip.mp4", "must start with sestore<N>/"),
    ("sestore１/jb/videos/clip.mp4", "must start with sestore<N>/"),  # a full-width digit
    ("sestore1/jb/./videos/clip.mp4", "'.'"),
    ("sestore1/jb/videos/clip.mp4/", "empty"),
    ("sestore1/jb/videos/clip.mp4/..", "'..'"),
    ("sestore1/jb\\..\\other/secret.mp4", "relative"),
    ("sestore3/jb/videos/clip.mp4", "no such store"),
    ("sestore1/jb/videos/clip.mp4/x", "not a directory"),
]


def test_malformed_paths_are_refused_naming_the_path_without_a_traceback(
    live_server: Any, s3_account: Any, bucket: str, tree: Tree, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    for path, why in MALFORMED:
        answer = submit(live_server, s3_account, path, bucket)
        assert answer["status"] == "failure", (path[:40], answer)
        assert answer["code"] == "0007", (path[:40], answer)
        assert answer["message"].startswith("invalid path: "), answer
        assert why in answer["message"], (path[:40], answer)
        assert len(answer["message"]) < 4300
    # The server's own log lines are captured (one refusal each), and none has a traceback.
    refused = [r for r in caplog.records if getattr(r, "action", "") == "api.refused"]
    assert len(refused) == len(MALFORMED)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text
    assert records(live_server, s3_account) == {}  # nothing was queued


# -- the race -----------------------------------------------------------------------------

# The customer's side of the race, as its own process (SFTP server, rsync): the name flips
# between a symlink out and a regular file (a hard link to inside bytes), each flip one
# atomic rename, as fast as it can, until the stop file appears (or the time is up), and
# ends as the regular file.
FLIPPER = textwrap.dedent(
    """
    import os, sys, time
    name, inside, stop, seconds, *targets = sys.argv[1:]
    tmp_file, tmp_link = name + ".flip-file", name + ".flip-link"
    flips = 0
    os.symlink(targets[0], tmp_link)
    os.link(inside, tmp_file)
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end and not (flips % 200 == 0 and os.path.exists(stop)):
        os.replace(tmp_link, name)
        # Each state lasts one syscall: preparing the next entry of the other kind.
        os.symlink(targets[flips // 2 % len(targets)], tmp_link)
        os.replace(tmp_file, name)
        os.link(inside, tmp_file)
        flips += 2
    print(flips)
    """
)
# The race runs at least this long, and on until a submit has met the symlink (on a loaded
# machine the flipper may be descheduled for long stretches, in either state): at most
# RACE_LIMIT seconds.
RACE_SECONDS = 3.0
RACE_LIMIT = 30.0


def test_file_flipped_with_a_symlink_while_uploads_run_never_leaks(
    live_server: Any, service: Any, s3_account: Any, s3: Any, bucket: str, tree: Tree
) -> None:
    inside = tree.fill(".inside.mp4")
    name = tree.jb / "race.mp4"
    os.link(inside, name)
    targets = [
        str(tree.other / "secret.mp4"),  # another customer's file
        str(tree.far / "secret.mp4"),  # a file outside the sestore
        "../other/secret.mp4",
        "../../../outside/secret.mp4",
    ]
    assert (name.parent / targets[3]).resolve() == (tree.far / "secret.mp4").resolve()

    worker = Worker(service)
    worker_thread = threading.Thread(target=worker.run)
    worker_thread.start()
    stop = tree.root / "stop-flipping"
    argv = [str(name), str(inside), str(stop), str(RACE_LIMIT), *targets]
    flipper = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, *argv],
        stdout=subprocess.PIPE,
        text=True,
    )
    answers: list[dict] = []
    lock = threading.Lock()
    met_the_link = threading.Event()

    def submitter() -> None:
        # Many uploads of that name, each a distinct request (its own key); paced, so that
        # the worker keeps up with them.
        while flipper.poll() is None:
            answer = submit(live_server, s3_account, "sestore1/jb/race.mp4", bucket)
            with lock:
                answers.append(answer)
            if answer["status"] == "failure":
                met_the_link.set()
            time.sleep(0.02)

    try:
        submitters = [threading.Thread(target=submitter) for _ in range(3)]
        for thread in submitters:
            thread.start()
        time.sleep(RACE_SECONDS)
        met_the_link.wait(RACE_LIMIT - RACE_SECONDS)
        stop.touch()
        for thread in submitters:
            thread.join(RACE_LIMIT + 30)
        flips = int(flipper.communicate(timeout=30)[0])
        # Every request settles: uploaded, or failed for good.
        deadline = time.monotonic() + 60
        queued = [a["data"]["id"] for a in answers if a["status"] == "success"]
        while True:
            status = records(live_server, s3_account)
            if all(status[i]["state"] in ("succeeded", "failed") for i in queued):
                break
            assert time.monotonic() < deadline, "requests did not settle"
            time.sleep(0.2)
    finally:
        if flipper.poll() is None:
            flipper.kill()
            flipper.wait()
        worker.stop(grace=0)
        worker_thread.join(30)

    refused_at_submit = 0
    for answer in answers:
        if answer["status"] == "failure":
            # The submit met the symlink: refused, and it says why.
            assert answer["code"] == "0007", answer
            assert answer["message"] == (
                "invalid path: path resolves outside your user directory"
            ), answer
            refused_at_submit += 1
    outcomes = {"succeeded": 0, "link": 0, "changed": 0, "retried": 0}
    for request_id in queued:
        record = status[request_id]
        outcomes["retried"] += record["attempts"] > 1  # met a flip while reading
        if record["state"] == "succeeded":
            outcomes["succeeded"] += 1
        elif "path resolves outside your user directory" in record["message"]:
            outcomes["link"] += 1  # the worker met the symlink when it opened the file
        else:
            # The file it had open was renamed away mid-read; retried until out of attempts.
            assert "source file changed while uploading" in record["message"], record
            outcomes["changed"] += 1
    objects = bucket_objects(s3, bucket)
    print(
        f"flips={flips} submits={len(answers)} refused_at_submit={refused_at_submit} "
        f"queued={len(queued)} {outcomes} objects={len(objects)}"
    )
    # The race was really run: many flips, both states met.
    assert flips >= 200
    assert len(answers) >= 20
    assert len(queued) >= 1
    assert refused_at_submit + outcomes["link"] >= 1
    # Nothing from outside reached the bucket, and every success is the inside file.
    assert outcomes["succeeded"] == len(objects)
    assert_nothing_from_outside(objects)


# -- the opener and the uploader, directly ------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Tree:
    root = tmp_path / "stores"
    jb = root / "sestore1" / "jb"
    other = root / "sestore1" / "other"
    far = tmp_path / "outside"
    for directory in (jb / "videos", other, far):
        directory.mkdir(parents=True)
    (jb / "videos" / "clip.mp4").write_bytes(INSIDE)
    (other / "secret.mp4").write_bytes(secret(OTHER_MARK))
    (far / "secret.mp4").write_bytes(secret(FAR_MARK))
    return Tree(root=root, jb=jb, other=other, far=far)


def test_open_source_holds_the_file_not_the_name(store: Tree) -> None:
    with sestore.open_source(store.root, "sestore1/jb/videos/clip.mp4", "jb") as opened:
        # Swapped for a symlink out right after the open: the fd still reads the file.
        swap_in_link(store, "videos/clip.mp4", "{far}/secret.mp4")
        assert os.pread(opened.fd, SIZE + 1, 0) == INSIDE
        assert opened.size == SIZE and opened.name == "clip.mp4"
        assert opened.path == "sestore1/jb/videos/clip.mp4"
        assert opened.changed() == "it was changed, renamed or removed"
    assert opened.closed
    with pytest.raises(PathRefused, match="outside your user directory"):
        sestore.open_source(store.root, "sestore1/jb/videos/clip.mp4", "jb")


def test_open_source_refuses_everything_with_path_refused(store: Tree) -> None:
    root = store.root
    cases = {
        "": "empty",
        "sestore1/jb/" + "l.mp4": "no such file",
        "sestore1/other/secret.mp4": "your own user directory",
        "sestore1/jb": "sestore<N>/<username>/<file>",
    }
    for path, why in cases.items():
        with pytest.raises(PathRefused, match=why):
            sestore.open_source(root, path, "jb")
    # A symlink target so long it takes too many steps (each '.' is one).
    (store.jb / "steps.mp4").symlink_to("./" * 600 + "videos/clip.mp4")
    with pytest.raises(PathRefused, match="steps to resolve"):
        sestore.open_source(root, "sestore1/jb/steps.mp4", "jb")
    # Directories nested deeper than MAX_COMPONENTS, reached through a symlink.
    (store.jb / Path(*["e"] * 70)).mkdir(parents=True)
    (store.jb / "d").symlink_to("/".join(["e"] * 70))
    with pytest.raises(PathRefused, match="directories deep"):
        sestore.open_source(root, "sestore1/jb/d/x.mp4", "jb")
    # No store root at all.
    with pytest.raises(PathRefused, match="no such store"):
        sestore.open_source(root / "missing", "sestore1/jb/videos/clip.mp4", "jb")
    # The user has no directory (yet).
    with pytest.raises(PathRefused, match="no such file"):
        sestore.open_source(root, "sestore1/nobody/x.mp4", "nobody")


def test_running_out_of_file_descriptors_is_transient(store: Tree) -> None:
    # In a process of its own: EMFILE is the server's trouble, not the path's, so the
    # worker retries it rather than failing the request for good.
    script = textwrap.dedent(
        f"""
        import os, resource
        from vodpush import sestore
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 1, used + 1))
        try:
            sestore.open_source({str(store.root)!r}, "sestore1/jb/videos/clip.mp4", "jb")
        except sestore.PathRefused as exc:
            print(exc.transient, exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True cannot open sestore1/jb/videos/clip.mp4 now: "), done


class Opener:
    """sestore.open_source for the uploader, remembering what it opened (to check it was
    closed) and optionally doing something right after the open (the customer's move)."""

    def __init__(self, store: Tree, path: str, after: Any = None) -> None:
        self.open = functools.partial(sestore.open_source, store.root, path, "jb")
        self.after = after
        self.opened: list[sestore.OpenFile] = []

    def __call__(self) -> sestore.OpenFile:
        opened = self.open()
        self.opened.append(opened)
        if self.after is not None:
            self.after()
        return opened


@pytest.fixture
def s3_direct(s3: Any) -> Any:
    client = make_s3_client(s3.settings())
    name = f"src-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return client, name


def open_uploads(client: Any, bucket: str) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def run_upload(client: Any, job: UploadJob, ledger: Any = None, **options: Any) -> Any:
    tuning = {"threshold": 5 * MiB, "chunksize": 5 * MiB, "concurrency": 2} | options
    return upload(client, job, ledger or MemoryLedger(), **tuning)


def test_uploader_reads_the_open_file_and_closes_it_whatever_happens(
    s3_direct: Any, store: Tree
) -> None:
    client, bucket = s3_direct
    big = os.urandom(11 * MiB)
    (store.jb / "big.mp4").write_bytes(big)
    # Success, multipart: the parts come from the fd, in parallel.
    opener = Opener(store, "sestore1/jb/big.mp4")
    result = run_upload(client, UploadJob(source=opener, bucket=bucket, key="big.mp4"))
    assert result.parts_total == 3
    assert client.get_object(Bucket=bucket, Key="big.mp4")["Body"].read() == big
    # An S3 failure.
    failing = Opener(store, "sestore1/jb/big.mp4")
    with pytest.raises(UploadError, match="NoSuchBucket"):
        run_upload(client, UploadJob(source=failing, bucket="no-such-bucket-x", key="x"))
    # An interruption (shutdown, or the lease lost) between parts.
    calls = iter(range(100))
    stopped = Opener(store, "sestore1/jb/big.mp4")
    stopped_job = UploadJob(source=stopped, bucket=bucket, key="stopped.mp4")
    ledger = MemoryLedger()
    with pytest.raises(UploadInterrupted):
        run_upload(client, stopped_job, ledger, should_stop=lambda: next(calls) >= 2)
    assert ledger.load() is not None and len(open_uploads(client, bucket)) == 1
    # Before the next attempt the file becomes a link out: refused for good, and the
    # multipart upload the first attempt left is aborted rather than left behind.
    swap_in_link(store, "big.mp4", "{far}/secret.mp4")
    with pytest.raises(UploadError, match="source file unavailable: path resolves") as info:
        run_upload(client, stopped_job, ledger)
    assert not info.value.transient and info.value.code == "SourceUnavailable"
    assert ledger.load() is None and open_uploads(client, bucket) == []
    # The customer swaps the file for a link to a secret right after the open: the fd's
    # bytes are sent or nothing is; here the rename shows in ctime, so nothing.
    swapped = Opener(
        store,
        "sestore1/jb/videos/clip.mp4",
        after=lambda: swap_in_link(store, "videos/clip.mp4", "{other}/secret.mp4"),
    )
    with pytest.raises(UploadError, match="source file changed while uploading") as info:
        run_upload(client, UploadJob(source=swapped, bucket=bucket, key="swapped.mp4"))
    assert info.value.transient
    assert "sestore1/jb/videos/clip.mp4" in str(info.value)  # the API path, not the disk's
    # The opener refuses: a permanent, clear failure.
    with pytest.raises(UploadError, match="source file unavailable: path resolves outside"):
        run_upload(client, UploadJob(source=swapped, bucket=bucket, key="again.mp4"))
    for opener_used in (opener, failing, stopped, swapped):
        assert opener_used.opened and all(f.closed for f in opener_used.opened)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in listed] == ["big.mp4"]


def test_uploader_takes_an_open_file_and_leaves_it_open(s3_direct: Any, store: Tree) -> None:
    client, bucket = s3_direct
    with sestore.open_source(store.root, "sestore1/jb/videos/clip.mp4", "jb") as opened:
        run_upload(client, UploadJob(source=opened, bucket=bucket, key="a.mp4"))
        assert not opened.closed  # its owner closes it
        run_upload(client, UploadJob(source=opened, bucket=bucket, key="b.mp4"))
    for key in ("a.mp4", "b.mp4"):
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == INSIDE
    with pytest.raises(ValueError, match="source must be"):
        UploadJob(source=42, bucket=bucket, key="c")  # type: ignore[arg-type]


def test_no_descriptor_leaks(store: Tree) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for path in ("sestore1/jb/videos/clip.mp4", "sestore1/jb/nothing", "sestore1/jb/videos"):
        for _ in range(50):
            with contextlib.suppress(PathRefused):
                sestore.check(store.root, path, "jb")
    (store.jb / "deep").symlink_to("videos/../videos/../videos/../../other/secret.mp4")
    for _ in range(50):
        with pytest.raises(PathRefused):
            sestore.check(store.root, "sestore1/jb/deep", "jb")
    assert len(os.listdir("/proc/self/fd")) == before
