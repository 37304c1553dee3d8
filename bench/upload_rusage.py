"""Run a command and report its own peak RSS, CPU and wall time, exactly (for upload_bench).

    python -I -S upload_rusage.py REPORT.json COMMAND [ARG...]

Why a launcher: on Linux a child's ``ru_maxrss`` keeps the high-water mark of the memory it
was forked from, so a command forked straight from the benchmark (a Python process holding
boto3, SQLAlchemy, rich...) would report at least the benchmark's own RSS. This launcher is a
bare interpreter (``-I -S``, nothing imported but builtins), so the floor it passes on is a
few MB; it spawns the command, waits for it with ``os.wait4`` (that child's rusage alone),
writes the numbers as JSON to REPORT.json and exits with the command's exit status.
SIGINT and SIGTERM are passed on to the command.
"""

import os
import signal
import sys
import time


def main() -> int:
    report, argv = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    started = time.time()
    pid = os.posix_spawnp(argv[0], argv, os.environ)

    def forward(signum: int, frame: object) -> None:
        os.kill(pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    import json  # only now: what is loaded before the spawn is the floor the child inherits

    with open(report, "w") as f:
        json.dump(
            {
                "seconds": seconds,
                "started": started,
                "maxrss_kib": usage.ru_maxrss,
                "utime": usage.ru_utime,
                "stime": usage.ru_stime,
                "exit": code,
            },
            f,
        )
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
