"""Prefect flows over the ``pipeline`` library: flows orchestrate, tasks call library functions."""

import os

# Offline by design: no telemetry (its writes also contend for the ephemeral server's SQLite
# database), and a generous start-up time for the ephemeral server on busy two-core machines.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
