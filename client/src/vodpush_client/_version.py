"""The version of the vodpush-client distribution (read by its pyproject.toml)."""

__version__ = "0.1.0"
