"""The shared types and facts of vodpush: accounts, request records, the multipart
checkpoint, object options, the clock. Imports nothing else of vodpush and no database, S3
or HTTP library (an import-linter contract checks it), so every layer may use it."""
