"""Defaults of ``batch run`` shared by the command line and the runner (no heavy imports)."""

CONCURRENCY = 32
"""Analyze calls in flight: enough to keep the gateway's batches full."""

PART_ROWS = 1000
"""Rows per part file: what a kill can lose (and redo) at most, besides calls in flight;
fewer rows make more, smaller files."""
