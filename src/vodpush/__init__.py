"""vodpush: a self-hosted ScaleEngine-compatible API that pushes VOD files to S3."""

__version__ = "0.1.0"
