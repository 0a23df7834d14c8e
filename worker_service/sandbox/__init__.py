"""The worker's sandbox (docs/protocol.md section 5)."""
