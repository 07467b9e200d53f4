"""Kept for the modules that still import HistoryRow from here: it lives in runs/history.py."""

from fedlora_cli.runs.history import HistoryRow

__all__ = ["HistoryRow"]
