"""sweep.json: what a sweep recorded, and which report files in its folder are its own."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedlora_cli.errors import InputError
from fedlora_cli.jsonfile import read_json
from fedlora_cli.sweeps.spec import Sweep

SWEEP_RECORD = "sweep.json"
REPORTS = "reports"  # sweep.json: {report file name: sha256} of the reports this sweep wrote


def read_sweep_record(sweep: Sweep) -> dict[str, Any]:
    path = sweep.folder / SWEEP_RECORD
    if not os.path.lexists(path):
        return {}
    return read_json(path, "sweep record", hint="move it away to start the sweep afresh")


def canonical(options: dict[str, Any]) -> str:
    """Options as one comparable string: keys in their dashed spelling, sorted."""
    return json.dumps({str(k).replace("_", "-"): v for k, v in options.items()}, sort_keys=True, default=str)


REPORT_FILES = (
    "report.csv",
    "report.md",
    "report.png",
    "report-last.csv",
    "table.csv",
    "table.md",
    "table-last.csv",
    "compare.csv",
    "clients.csv",
    "clients.png",
    "tuning.csv",
    "tuning.md",
)


def _is_report(name: str) -> bool:
    """The names a sweep's report writes in its folder (and so refuses to replace unless it wrote them)."""
    return name in REPORT_FILES or (name.startswith("report-") and name.endswith(".png"))


def check_reports(sweep: Sweep) -> None:
    """Every report file in the sweep's folder is one this sweep wrote and nobody changed since (its sha256 is
    in sweep.json): otherwise it is the user's, and writing the report would replace it. One line naming
    it."""
    if not sweep.folder.is_dir():
        return
    owned = read_sweep_record(sweep).get(REPORTS)
    owned = owned if isinstance(owned, dict) else {}
    for path in sorted(sweep.folder.iterdir()):
        if _is_report(path.name) and not (
            path.is_file() and not path.is_symlink() and owned.get(path.name) == file_sha256(path)
        ):
            raise InputError(
                f"{path} was not written by this sweep (or was changed since): fedlora never replaces what "
                "it did not write; move it away, or give the sweep another name"
            )


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
