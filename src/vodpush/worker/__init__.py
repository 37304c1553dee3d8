"""The upload worker: S3 client construction and the upload engine."""
