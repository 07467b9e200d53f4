"""sweep.json: what a sweep recorded, and which report files in its folder are its own."""

from __future__ import annotations

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


def _is_report(name: str) -> bool:
    return name in ("report.csv", "report.md", "report.png", "table.csv", "table.md") or (
        name.startswith("report-") and name.endswith(".png")
    )


def check_reports(sweep: Sweep) -> None:
    """Every report file in the sweep's folder is one this sweep wrote and nobody changed since (its sha256 is in
    sweep.json): otherwise it is the user's, and writing the report would replace it. One line naming it."""
    if not sweep.folder.is_dir():
        return
    owned = read_sweep_record(sweep).get(REPORTS)
    owned = owned if isinstance(owned, dict) else {}
    for path in sorted(sweep.folder.iterdir()):
        if _is_report(path.name) and not (
            path.is_file() and not path.is_symlink() and owned.get(path.name) == file_sha256(path)
        ):
            raise InputError(
                f"{path} was not written by this sweep (or was changed since): fedlora never replaces what it "
                f"did not write; move it away, or give the sweep another name"
            )


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
