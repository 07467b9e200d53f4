"""Kept for the modules that still import from here (federation.py, flower/relay.py): see runs/integrity.py."""

from fedlora_cli.runs.integrity import (  # noqa: F401
    FILES_KEY,
    RECORD_KEY,
    STATE_FILE,
    DamagedRun,
    check_round,
    check_state_file,
    damaged,
    last_recorded_round,
    read_round_record,
    record_digest,
    round_digests,
    sealed,
    sha256_file,
)
