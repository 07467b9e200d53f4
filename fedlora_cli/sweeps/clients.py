"""The per-client table of a sweep report: what each client's own model scores on its own local test split
(`--client-test-fraction`), per cell — the view personalisation is judged by.

A run evaluated on the clients' local tests records, in final/metrics.json, `per_client` (mean, worst10,
worst and best over its clients, of the final models: each client's own for personal methods and after
`--personalize-epochs`, the global adapter otherwise) and, after fine-tuning, `per_client_global` (the global
adapter before it). The table gives each statistic as mean ± std over the seeds, and the clients' mean and
worst 10 % of each cell against the best clients' mean among the cells scored on the same local tests — seed
by seed the same clients' same examples (the run record's `client_test.sha256`), so the paired test compares
methods, not data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora_cli.sweeps.stats import finite, paired_test, plus_minus

STATS = ("mean", "worst10", "worst", "best")
HEADERS = {"mean": "clients' mean", "worst10": "worst 10 %", "worst": "worst client", "best": "best client"}
BEFORE = "before fine-tuning"  # the global adapter's clients' mean, where a run fine-tuned it
PAIRED = ("mean", "worst10")  # the statistics tested against the best cell on the same local tests
SPLITS = "splits"  # the fingerprint of the run's local splits (run record: client_test.sha256)


def client_stats(extra: Mapping[str, Any], splits: str | None = None) -> dict[str, Any]:
    """One run's per-client statistics from its final metrics' extra fields ({}: none recorded); `splits`:
    the fingerprint of its clients' local splits, what pairs it with another cell's run of the same seed."""
    per_client = extra.get("per_client")
    if not isinstance(per_client, dict):
        return {}
    out: dict[str, Any] = {"model": str(per_client.get("model", ""))}
    if splits:
        out[SPLITS] = splits
    for key in STATS:
        if (value := finite(per_client.get(key))) is not None:
            out[key] = value
    values = per_client.get("values")
    if isinstance(values, dict):  # each client's own score: what the clients figure draws
        out["values"] = [v for v in map(finite, values.values()) if v is not None]
    before = extra.get("per_client_global")
    if isinstance(before, dict) and (value := finite(before.get("mean"))) is not None:
        out[BEFORE] = value
    return out


def clients_rows(cells: list[Any], seeds: list[int]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows (a cell per row, each statistic as mean ± std over seeds), or None when no run of the
    sweep recorded per-client results. `cells` carry `.cell` and `.clients` (seed -> client_stats)."""
    scored = [r for r in cells if r.clients]
    if not scored:
        return None
    before = any(BEFORE in s for r in scored for s in r.clients.values())
    header = [
        "cell",
        "model",
        "seeds",
        *(HEADERS[k] for k in STATS),
        *([f"{BEFORE} (mean)"] if before else []),
        *(f"vs best: {HEADERS[k]}" for k in PAIRED),
    ]
    best = _best_on_the_same_tests(scored, seeds)
    rows = []
    for r in scored:
        runs = [r.clients[s] for s in seeds if s in r.clients]
        models = sorted({s["model"] for s in runs if s.get("model")})
        row = [r.cell.name, "/".join(models), str(len(runs))]
        row += [plus_minus([s[k] for s in runs if k in s]) for k in STATS]
        if before:
            row.append(plus_minus([s[BEFORE] for s in runs if BEFORE in s]))
        row += [_versus(r, best.get(id(r)), key, seeds) for key in PAIRED]
        rows.append(row)
    return header, rows


def _same_tests(a: Any, b: Any, seeds: list[int]) -> bool:
    """Whether two cells scored every seed both ran on the same local splits (a known fingerprint each)."""
    common = [s for s in seeds if s in a.clients and s in b.clients]
    return bool(common) and all(
        a.clients[s].get(SPLITS) is not None and a.clients[s].get(SPLITS) == b.clients[s].get(SPLITS)
        for s in common
    )


def _per_seed(r: Any, key: str, seeds: list[int]) -> dict[int, float]:
    """seed -> the cell's statistic `key`, for the seeds whose run recorded it."""
    return {s: r.clients[s][key] for s in seeds if key in r.clients.get(s, {})}


def _mean_over_seeds(r: Any, key: str, seeds: list[int]) -> float | None:
    values = list(_per_seed(r, key, seeds).values())
    return sum(values) / len(values) if values else None


def _best_on_the_same_tests(cells: list[Any], seeds: list[int]) -> dict[int, Any]:
    """For each cell (by id) scored on the same local tests as some other cell, the one among them (itself
    included) with the highest clients' mean; a tie keeps the first."""
    out: dict[int, Any] = {}
    for r in cells:
        group = [o for o in cells if o is r or _same_tests(r, o, seeds)]
        if len(group) < 2:
            continue
        best = None
        for o in group:
            value = _mean_over_seeds(o, "mean", seeds)
            if value is not None and (best is None or value > best[0]):
                best = (value, o)
        if best is not None:
            out[id(r)] = best[1]
    return out


def _versus(r: Any, best: Any, key: str, seeds: list[int]) -> str:
    """`r`'s statistic against the best cell's, paired by seed (× 100): "best", "Δ, p = … (n = …)", or ""
    when no other cell was scored on the same tests."""
    if best is None:
        return ""
    if best is r:
        return "best"
    test = paired_test(_per_seed(r, key, seeds), _per_seed(best, key, seeds))
    if test.difference is None:
        return ""
    text = f"{100 * test.difference:+.1f}"
    return f"{text}, p = {test.p:.2g} (n = {test.n})" if test.p is not None else f"{text} (n = {test.n})"
