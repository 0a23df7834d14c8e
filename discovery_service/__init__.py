"""The discovery service: worker pool, task keys and the credit ledger."""
