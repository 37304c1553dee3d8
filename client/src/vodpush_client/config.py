"""A client's settings from the environment, as boto3 reads ``AWS_*``.

=====================  ==========================================================
``VODPUSH_URL``        the API endpoint (a bare server URL means its ``/stable/``)
``VODPUSH_CDN``        the CDN id of the account
``VODPUSH_API_KEY``    its API key
``VODPUSH_API_SECRET`` its API secret
``VODPUSH_TIMEOUT``    seconds for each step of an HTTP attempt (optional; 10)
=====================  ==========================================================

The same variables are read by ``vodpush client`` (the command line of the server package).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["VARIABLES", "client_arguments"]

# Argument of Client -> the variable giving it when the argument is not passed.
VARIABLES = {
    "url": "VODPUSH_URL",
    "cdn": "VODPUSH_CDN",
    "api_key": "VODPUSH_API_KEY",
    "api_secret": "VODPUSH_API_SECRET",
    "timeout": "VODPUSH_TIMEOUT",
}
_REQUIRED = ("url", "cdn", "api_key", "api_secret")


def client_arguments(
    overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The keyword arguments of a client: each of ``VARIABLES`` from ``overrides`` when
    given there (not None or ""), else from its variable; every other override as it is.
    ValueError names each variable that is missing, or the one that is wrong (never its
    value when it is a secret)."""
    environ = os.environ if environ is None else environ
    arguments = dict(overrides)
    missing = []
    for name, variable in VARIABLES.items():
        given = arguments.pop(name, None)
        value = given if given not in (None, "") else environ.get(variable, "").strip()
        if value in (None, ""):
            if name in _REQUIRED:
                missing.append(variable)
            continue
        arguments[name] = value
    if missing:
        raise ValueError(f"set {', '.join(missing)} (or pass them to from_env)")
    arguments["cdn"] = _positive(arguments["cdn"], VARIABLES["cdn"], int)
    if "timeout" in arguments:
        arguments["timeout"] = _positive(arguments["timeout"], VARIABLES["timeout"], float)
    return arguments


def _positive(value: Any, variable: str, kind: type[int] | type[float]) -> Any:
    what = "a whole number" if kind is int else "a number of seconds"
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{variable} must be {what} above 0, not {value!r}") from None
    if not (math.isfinite(number) and number > 0) or isinstance(value, bool):
        raise ValueError(f"{variable} must be {what} above 0, not {value!r}")
    return number
