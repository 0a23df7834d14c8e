"""The worker service volunteers run (arrives with the worker issue)."""
