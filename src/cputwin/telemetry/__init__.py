"""Telemetry: the schema, loading runs from disk, sampling this machine, labelled workloads."""

from cputwin.telemetry.ingest import load_runs
from cputwin.telemetry.schema import RUN_COLUMN, Schema

__all__ = ["RUN_COLUMN", "Schema", "load_runs"]
