"""Telemetry: the schema, loading runs from disk, sampling this machine, labelled workloads."""
