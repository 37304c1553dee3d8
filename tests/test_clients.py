"""The S3 client cache (transfer.clients): one client per set of credentials, bounded,
refreshed before a TTL or the credentials run out, built once under concurrent lookups, and
never showing a secret. Unit tier: a counting builder on a fake clock, real botocore clients
(building one opens no socket), and the worker on the in-memory stores."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vodpush.config import Settings
from vodpush.core.accounts import S3Settings
from vodpush.core.requests import NewRequest
from vodpush.crypto import generate_key
from vodpush.service import Service
from vodpush.transfer import UploadResult
from vodpush.transfer.clients import NON_CLIENT_FIELDS, Built, ClientCache, ClientKey
from vodpush.transfer.s3client import s3_client_cache
from vodpush.worker.runner import Worker

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
OWN = S3Settings(
    endpoint_url="http://127.0.0.1:9000",
    region="us-east-1",
    access_key_id="AKIAOWN",
    secret_access_key=SECRET,
)
DEFAULT = S3Settings()  # the operator's AWS_* credentials


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Builder:
    """Counts builds; each client is a fresh object naming the settings' key id and build."""

    def __init__(self, expires_in: float | None = None) -> None:
        self.expires_in = expires_in
        self.calls: list[S3Settings] = []
        self.fail = False
        self.lock = threading.Lock()

    def __call__(
        self, s3: S3Settings, session_name: str | None = None
    ) -> Built[tuple[str | None, int]]:
        with self.lock:
            if self.fail:
                raise RuntimeError("credential source unavailable")
            self.calls.append(s3)
            return Built((s3.access_key_id, len(self.calls)), self.expires_in)


def make_cache(
    builder: Builder, clock: Clock, *, max_size: int = 8, ttl: float = 900, margin: float = 60
) -> ClientCache[Any]:
    return ClientCache(builder, max_size=max_size, ttl=ttl, refresh_margin=margin, clock=clock)


# -- reuse -----------------------------------------------------------------------------------


def test_accounts_with_the_same_credentials_share_one_client() -> None:
    builder, clock = Builder(), Clock()
    cache = make_cache(builder, clock)
    # Another account with the same keys but its own encryption settings.
    kms = dataclasses.replace(OWN, sse="aws:kms", sse_kms_key_id="key-1")
    first = cache.client(OWN)
    assert cache.client(dataclasses.replace(OWN)) is first
    assert cache.client(kms) is first
    assert cache.client(DEFAULT) is cache.client(S3Settings())
    assert len(builder.calls) == 2 and len(cache) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"secret_access_key": SECRET + "x"},  # a rotated secret, same key id
        {"access_key_id": "AKIAOTHER"},
        {"endpoint_url": "http://127.0.0.1:9001"},
        {"region": "eu-west-1"},
        {"checksums": False},
    ],
)
def test_what_shapes_a_client_gets_its_own(change: dict[str, Any]) -> None:
    builder = Builder()
    cache = make_cache(builder, Clock())
    first = cache.client(OWN)
    other = cache.client(dataclasses.replace(OWN, **change))
    assert other is not first
    assert cache.client(OWN) is first
    assert len(builder.calls) == 2


def test_every_settings_field_is_in_the_key_or_known_not_to_shape_the_client() -> None:
    # A new S3Settings field (an assumed role, a profile) must be decided on: in the key,
    # or listed as an object option. Else accounts would share a client they must not.
    settings = {f.name for f in dataclasses.fields(S3Settings)}
    # (The session name of a role comes from the account, not from its settings.)
    keyed = {f.name for f in dataclasses.fields(ClientKey)} - {"secret_digest", "session_name"}
    assert settings == keyed | {"secret_access_key"} | NON_CLIENT_FIELDS


# -- bounds ----------------------------------------------------------------------------------


def test_the_cache_keeps_at_most_max_size_least_recently_used_first() -> None:
    builder = Builder()
    cache = make_cache(builder, Clock(), max_size=3)
    accounts = [dataclasses.replace(OWN, access_key_id=f"AKIA{i}") for i in range(5)]
    clients = [cache.client(s3) for s3 in accounts[:3]]
    assert cache.client(accounts[0]) is clients[0]  # now the most recently used
    cache.client(accounts[3])  # evicts accounts[1]
    cache.client(accounts[4])  # evicts accounts[2]
    assert len(cache) == 3 and cache.evictions == 2
    assert cache.client(accounts[0]) is clients[0]
    assert len(builder.calls) == 5
    assert cache.client(accounts[1]) is not clients[1]  # built again
    assert len(builder.calls) == 6 and len(cache) == 3


def test_settings_bound_the_workers_cache(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",
        secret_key=generate_key(),
        s3_client_cache_size=7,
        s3_client_ttl=120,
        s3_client_refresh_margin=30,
    )
    worker = Worker(Service.in_memory(settings))
    cache = worker._clients.cache  # type: ignore[attr-defined]
    assert (cache.max_size, cache.ttl, cache.refresh_margin) == (7, 120, 30)


# -- refresh ---------------------------------------------------------------------------------


def test_a_client_is_rebuilt_after_the_ttl() -> None:
    builder, clock = Builder(), Clock()
    cache = make_cache(builder, clock, ttl=900)
    first = cache.client(OWN)
    clock.now += 899
    assert cache.client(OWN) is first
    clock.now += 2
    second = cache.client(OWN)
    assert second is not first and len(builder.calls) == 2
    clock.now += 899
    assert cache.client(OWN) is second


def test_expiring_credentials_are_refreshed_a_margin_before_they_expire() -> None:
    builder, clock = Builder(expires_in=900), Clock()
    cache = make_cache(builder, clock, ttl=3600, margin=60)
    first = cache.client(OWN)
    clock.now += 839
    assert cache.client(OWN) is first
    clock.now += 2  # 59 s before the credentials expire
    assert cache.client(OWN) is not first
    assert len(builder.calls) == 2


def test_a_failed_refresh_keeps_the_valid_client_then_gives_up_at_expiry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    builder, clock = Builder(expires_in=900), Clock()
    cache = make_cache(builder, clock, ttl=3600, margin=60)
    first = cache.client(OWN)
    builder.fail = True
    clock.now += 850
    with caplog.at_level(logging.WARNING, logger="vodpush.transfer.clients"):
        assert cache.client(OWN) is first  # still valid for 50 s
    assert [r.action for r in caplog.records] == ["s3.client_refresh_failed"]
    clock.now += 51  # expired: never handed out
    with pytest.raises(RuntimeError, match="credential source unavailable"):
        cache.client(OWN)
    builder.fail = False
    assert cache.client(OWN) is not first


def test_a_failed_first_build_raises_and_caches_nothing() -> None:
    builder = Builder()
    builder.fail = True
    cache = make_cache(builder, Clock())
    with pytest.raises(RuntimeError):
        cache.client(OWN)
    assert len(cache) == 0
    builder.fail = False
    assert cache.client(OWN) == ("AKIAOWN", 1)


# -- concurrency -----------------------------------------------------------------------------


class SlowBuilder(Builder):
    """Builds block until ``release`` is set; ``started`` tells a build is under way."""

    def __init__(self, expires_in: float | None = None) -> None:
        super().__init__(expires_in)
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(
        self, s3: S3Settings, session_name: str | None = None
    ) -> Built[tuple[str | None, int]]:
        self.started.set()
        assert self.release.wait(20), "the test never released the build"
        return super().__call__(s3)


def _in_threads(n: int, target: Any) -> tuple[list[threading.Thread], list[Any]]:
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        value = target()
        with lock:
            results.append(value)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads, results


def test_concurrent_lookups_of_a_missing_key_build_it_once() -> None:
    builder = SlowBuilder()
    cache = make_cache(builder, Clock())
    threads, results = _in_threads(16, lambda: cache.client(OWN))
    assert builder.started.wait(10)
    time.sleep(0.05)  # let the others reach the cache and wait on the build
    builder.release.set()
    for thread in threads:
        thread.join(20)
    assert len(results) == 16 and len({id(r) for r in results}) == 1
    assert len(builder.calls) == 1


def test_a_slow_build_does_not_hold_up_other_keys_or_a_refreshing_key() -> None:
    builder, clock = SlowBuilder(), Clock()
    cache = make_cache(builder, clock, ttl=900)
    builder.release.set()
    cached = cache.client(DEFAULT)
    old = cache.client(OWN)
    builder.release.clear()
    builder.started.clear()
    clock.now += 901  # both due for a refresh
    threads, results = _in_threads(1, lambda: cache.client(OWN))  # refreshes, blocked
    assert builder.started.wait(10)
    # Meanwhile: the refreshing key serves its old (still valid) client, and a lookup of
    # another key is not blocked behind the build (neither waits: the build is held).
    assert cache.client(OWN) is old
    clock.now -= 901
    assert cache.client(DEFAULT) is cached
    builder.release.set()
    threads[0].join(20)
    assert results and results[0] is not old
    assert cache.client(OWN) is results[0]


def test_many_threads_many_keys_stay_bounded_and_consistent() -> None:
    builder = Builder()
    cache = make_cache(builder, Clock(), max_size=4)
    accounts = [dataclasses.replace(OWN, access_key_id=f"AKIA{i}") for i in range(10)]
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for i in range(500):
                s3 = accounts[(i * 7 + offset) % len(accounts)]
                client = cache.client(s3)
                assert client[0] == s3.access_key_id  # never another key's client
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(cache) == 4


# -- secrets ---------------------------------------------------------------------------------


def test_no_secret_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    builder, clock = Builder(expires_in=900), Clock()
    cache = make_cache(builder, clock)
    with caplog.at_level(logging.DEBUG, logger="vodpush.transfer.clients"):
        cache.client(OWN)
        builder.fail = True
        clock.now += 850
        cache.client(OWN)
    shown = [repr(cache), repr(cache.key(OWN)), str(cache.key(OWN))]
    shown += [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    assert caplog.records and all(SECRET not in text for text in shown)
    assert "AKIAOWN" in repr(cache.key(OWN))
    # The digest depends on the cache's own random key: not a lookup table of secrets.
    other = make_cache(Builder(), clock)
    assert other.key(OWN) != cache.key(OWN)


# -- real clients and the worker -------------------------------------------------------------


def test_real_clients_are_shared_by_credentials_not_by_account() -> None:
    cache = s3_client_cache(max_size=8, ttl=900, refresh_margin=600, max_pool_connections=16)
    own = cache.client(OWN)
    assert cache.client(dataclasses.replace(OWN, sse="AES256")) is own
    assert own.meta.endpoint_url == OWN.endpoint_url
    assert own.meta.region_name == "us-east-1"
    assert own.meta.config.max_pool_connections == 16
    assert own._request_signer._credentials.access_key == "AKIAOWN"
    other = cache.client(dataclasses.replace(OWN, access_key_id="AKIAB", secret_access_key="s"))
    assert other._request_signer._credentials.access_key == "AKIAB"
    assert own._request_signer._credentials.access_key == "AKIAOWN"  # not mixed up
    no_checksums = cache.client(dataclasses.replace(OWN, checksums=False))
    assert no_checksums.meta.config.request_checksum_calculation == "when_required"
    assert cache.builds == 3


def test_real_clients_built_from_many_threads_keep_their_own_credentials() -> None:
    # The shared session is not thread-safe: builds from it are serialized.
    cache = s3_client_cache(max_size=32, ttl=900, refresh_margin=600)
    keys = [f"AKIAT{i:02d}" for i in range(12)]
    built: dict[str, Any] = {}
    lock = threading.Lock()

    def build(key_id: str) -> None:
        client = cache.client(dataclasses.replace(OWN, access_key_id=key_id))
        with lock:
            built[key_id] = client

    threads = [threading.Thread(target=build, args=(k,)) for k in keys * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert cache.builds == 12 and len({id(c) for c in built.values()}) == 12
    for key_id, client in built.items():
        assert client._request_signer._credentials.access_key == key_id


@pytest.fixture
def memory_service(tmp_path: Path) -> Iterator[Service]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",  # never opened
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
        poll_interval=0.05,
        lease_seconds=5,
    )
    svc = Service.in_memory(settings)
    yield svc
    svc.close()


def test_the_worker_uses_one_client_per_set_of_credentials(memory_service: Service) -> None:
    service = memory_service
    own = [OWN, dataclasses.replace(OWN, access_key_id="AKIAB"), dataclasses.replace(OWN)]
    accounts = [(f"own{i}", s3) for i, s3 in enumerate(own)]
    accounts += [(f"shared{i}", DEFAULT) for i in range(3)]
    for n, (username, s3) in enumerate(accounts):
        created = service.accounts.create(cdn=1, username=username, s3=s3)
        service.accounts.allow_buckets(str(created["id"]), ["b"])
        for i in range(2):
            service.requests.enqueue(
                NewRequest(
                    created["id"],
                    1,
                    f"sestore1/{username}/{i}",
                    "k",
                    "b",
                    "private",
                    {},
                    "",
                    f"{n}-{i}",
                )
            )
    seen: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def uploader(client: Any, job: Any, ledger: Any, **kw: Any) -> UploadResult:
        with lock:
            seen.append((job.source.args[1].split("/")[1], client))
        return UploadResult({"ETag": '"e"'}, 200, "ab" * 32, 1, 1, 1)

    worker = Worker(service, concurrency=3, uploader=uploader)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert len(seen) == 12
    by_user: dict[str, set[int]] = {}
    for username, client in seen:
        by_user.setdefault(username, set()).add(id(client))
    clients = {id(c) for _, c in seen}
    # Three sets of credentials: AKIAOWN (own0 and own2), AKIAB (own1), the default.
    assert len(clients) == 3
    assert by_user["own0"] == by_user["own2"] != by_user["own1"]
    assert by_user["shared0"] == by_user["shared1"] == by_user["shared2"]
    assert all(len(ids) == 1 for ids in by_user.values())
