"""The Python client, importable here as it always was: it lives in the vodpush-client
distribution (``client/`` in this repository) as :mod:`vodpush_client`, which needs only
httpx; the server package installs it too. New code imports ``vodpush_client``."""

from vodpush_client import *  # noqa: F403
from vodpush_client import __all__ as __all__
