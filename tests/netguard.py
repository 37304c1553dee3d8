"""A guard for tests that must reach loopback only: name lookups of anything but localhost
fail as a missing name would, connections anywhere but loopback fail the test; both logged."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Any

import pytest


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class NetworkLog:
    lookups: list[str] = dataclasses.field(default_factory=list)
    connects: list[tuple[str, int]] = dataclasses.field(default_factory=list)


def guard_network(monkeypatch: pytest.MonkeyPatch, *, missing: str | None = None) -> NetworkLog:
    """Install the guard; ``missing`` is the text of the refused lookup's error (default:
    says the test forbade it)."""
    log = NetworkLog()
    real_getaddrinfo = socket.getaddrinfo
    real_create_connection = socket.create_connection

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        log.lookups.append(str(host))
        if host == "localhost" or is_loopback(str(host)):
            return real_getaddrinfo(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, missing or f"test forbids looking up {host!r}")

    def guarded_create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        assert is_loopback(address[0]), f"test forbids connecting to {address}"
        log.connects.append((address[0], address[1]))
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    return log
