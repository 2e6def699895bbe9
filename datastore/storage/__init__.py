"""The bytes on disk: staging files, hashing as they arrive, publishing, reconciling after a crash."""
