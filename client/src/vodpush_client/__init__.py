"""A Python client for the vodpush (ScaleEngine-compatible) API; it needs only httpx.

::

    from vodpush_client import Client

    # VODPUSH_URL, VODPUSH_CDN, VODPUSH_API_KEY, VODPUSH_API_SECRET (as boto3 reads AWS_*)
    with Client.from_env() as api:
        request_id = api.upload("sestore1/jb/show.mp4", "shows/show.mp4", "my-bucket", "private")
        final = api.wait(request_id, progress=lambda r: print(r.state, r.bytes_done))
        print(final.succeeded, final.last_updated)

:class:`AsyncClient` has the same methods, awaited. Requests are signed exactly as the PHP
reference client signs them (:mod:`vodpush_client.signing`) and sent as a urlencoded
``json`` form field. Failures the API reports come back as :class:`ApiError` (with the API's
``code``); everything that keeps an answer from arriving is a :class:`TransportError`.
Callbacks are verified with :func:`verify_callback`.
"""

from vodpush_client._async import AsyncClient
from vodpush_client._protocol import DEFAULT_TIMEOUT
from vodpush_client._sync import Client
from vodpush_client._version import __version__ as __version__
from vodpush_client.errors import (
    ApiError,
    ApiWarning,
    ClientError,
    FiltersUnsupported,
    RequestNotFound,
    TransportError,
    WaitTimeout,
)
from vodpush_client.options import disposition_header
from vodpush_client.records import (
    CallbackAttempt,
    CallbackHistory,
    Redelivery,
    StatusPage,
    StatusRecord,
)
from vodpush_client.webhooks import WebhookVerificationError, standard_webhooks_secret
from vodpush_client.webhooks import verify as verify_callback

__all__ = [
    "DEFAULT_TIMEOUT",
    "ApiError",
    "ApiWarning",
    "AsyncClient",
    "CallbackAttempt",
    "CallbackHistory",
    "Client",
    "ClientError",
    "FiltersUnsupported",
    "Redelivery",
    "RequestNotFound",
    "StatusPage",
    "StatusRecord",
    "TransportError",
    "WaitTimeout",
    "WebhookVerificationError",
    "disposition_header",
    "standard_webhooks_secret",
    "verify_callback",
]
