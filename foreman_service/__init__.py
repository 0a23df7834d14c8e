"""The foreman service a job serves while it runs (arrives with the foreman issue)."""
