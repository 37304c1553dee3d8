"""The soak's S3 fault proxy: a tests.s3server.ModalProxy in a process of its own, driven by
one command a line on stdin, so that its forwarding threads do not share the load
generator's interpreter (and skew the latencies it measures).

    python -m bench.soak_proxy --target 5000 --port 5001 --seed 7
    up | down | pass | slow DELAY | reset FRACTION MAX_BYTES | resets

Answers ``ready`` once listening, then ``ok`` (``resets``: the count of connections reset
so far) or ``error: ...`` to each command; exits when stdin closes.
"""

from __future__ import annotations

import argparse
import sys

from tests.s3server import ModalProxy


def handle(proxy: ModalProxy, line: str, up: bool) -> tuple[str, bool]:
    """Run one command; (the answer, whether the proxy listens afterwards)."""
    word, *args = line.split()
    if word == "up":
        if not up:
            proxy.start()
        return "ok", True
    if word == "down":
        if up:
            proxy.stop()
        return "ok", False
    if word == "pass":
        proxy.set_mode("pass")
    elif word == "slow":
        proxy.set_mode("slow", delay=float(args[0]))
    elif word == "reset":
        proxy.set_mode("reset", fraction=float(args[0]), max_bytes=int(args[1]))
    elif word == "resets":
        return str(proxy.resets), up
    else:
        raise ValueError(f"unknown command {word!r}")
    return "ok", up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, required=True, help="port of the S3 server")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    proxy = ModalProxy(args.target, port=args.port, seed=args.seed).start()
    up = True
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer, up = handle(proxy, line, up)
        except (ValueError, IndexError, OSError) as exc:
            answer = f"error: {exc}"
        print(answer, flush=True)
    proxy.stop()


if __name__ == "__main__":
    main()
