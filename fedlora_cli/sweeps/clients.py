"""The per-client table of a sweep report: what each client's own model scores on its own local test split
(`--client-test-fraction`), per cell — the view personalisation is judged by.

A run evaluated on the clients' local tests records, in final/metrics.json, `per_client` (mean, worst10,
worst and best over its clients, of the final models: each client's own for personal methods and after
`--personalize-epochs`, the global adapter otherwise) and, after fine-tuning, `per_client_global` (the global
adapter before it). The table gives each statistic as mean ± std over the seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora_cli.sweeps.stats import finite, plus_minus

STATS = ("mean", "worst10", "worst", "best")
HEADERS = {"mean": "clients' mean", "worst10": "worst 10 %", "worst": "worst client", "best": "best client"}
BEFORE = "before fine-tuning"  # the global adapter's clients' mean, where a run fine-tuned it


def client_stats(extra: Mapping[str, Any]) -> dict[str, Any]:
    """One run's per-client statistics from its final metrics' extra fields ({}: none recorded)."""
    per_client = extra.get("per_client")
    if not isinstance(per_client, dict):
        return {}
    out: dict[str, Any] = {"model": str(per_client.get("model", ""))}
    for key in STATS:
        if (value := finite(per_client.get(key))) is not None:
            out[key] = value
    before = extra.get("per_client_global")
    if isinstance(before, dict) and (value := finite(before.get("mean"))) is not None:
        out[BEFORE] = value
    return out


def clients_rows(cells: list[Any], seeds: list[int]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows (a cell per row, each statistic as mean ± std over seeds), or None when no run of the
    sweep recorded per-client results. `cells` carry `.cell` and `.clients` (seed -> client_stats)."""
    if not any(r.clients for r in cells):
        return None
    before = any(BEFORE in s for r in cells for s in r.clients.values())
    header = [
        "cell",
        "model",
        "seeds",
        *(HEADERS[k] for k in STATS),
        *([f"{BEFORE} (mean)"] if before else []),
    ]
    rows = []
    for r in cells:
        if not r.clients:
            continue
        runs = [r.clients[s] for s in seeds if s in r.clients]
        models = sorted({s["model"] for s in runs if s.get("model")})
        row = [r.cell.name, "/".join(models), str(len(runs))]
        row += [plus_minus([s[k] for s in runs if k in s]) for k in STATS]
        if before:
            row.append(plus_minus([s[BEFORE] for s in runs if BEFORE in s]))
        rows.append(row)
    return header, rows
