"""Prefect flows over the ``pipeline`` library: flows orchestrate, tasks call library functions."""
