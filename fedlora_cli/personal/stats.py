"""One metric over many clients: mean, spread, the worst client, the worst 10 % and the best (pure numbers, no
I/O).

The mean is over clients, unweighted: each client's model is scored on its own data, and a personalised
method is judged by how it serves each client, not by how it serves the examples of the largest ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

WORST_SHARE = 0.10  # worst10: the mean of the worst ceil(10 %) of the clients (at least one)


def client_stats(
    values: Mapping[int, float],
    metric: str,
    *,
    model: str,
    failed: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """`{metric, model, n, mean, std, worst, worst_client, worst10, best, best_client, values}` of the
    clients' `metric`; `model` says what was scored ("personal": each client's own; "global": the global
    adapter). Values that are not finite numbers do not count, and neither do `failed` clients (both are
    listed). std is the population standard deviation over clients (0 for one client)."""
    finite = {int(c): float(v) for c, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}
    out: dict[str, Any] = {"metric": metric, "model": model, "n": len(finite)}
    if finite:
        ordered = sorted(finite.items(), key=lambda item: (item[1], item[0]))
        xs = [v for _, v in ordered]
        n = len(xs)
        mean = math.fsum(xs) / n
        k = max(1, math.ceil(WORST_SHARE * n))
        out.update(
            mean=mean,
            std=math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / n),
            worst=xs[0],
            worst_client=ordered[0][0],
            worst10=math.fsum(xs[:k]) / k,
            best=xs[-1],
            best_client=ordered[-1][0],
        )
    out["values"] = {str(c): finite[c] for c in sorted(finite)}
    undefined = sorted(int(c) for c in values if int(c) not in finite)
    if undefined:
        out["undefined"] = undefined
    if failed:
        out["failed"] = {str(c): str(reason) for c, reason in sorted(failed.items())}
    return out


def describe(stats: Mapping[str, Any]) -> str:
    """One line: `accuracy over 10 clients: mean 0.8123 ± 0.0456, worst 0.7000 (client 4), worst 10 % 0.7000,
    best …`."""
    n = stats.get("n", 0)
    head = f"{stats.get('metric')} over {n} client{'' if n == 1 else 's'}"
    if not n:
        return f"{head}: none scored"
    return (
        f"{head} ({stats.get('model')}): mean {stats['mean']:.4f} ± {stats['std']:.4f}, worst "
        f"{stats['worst']:.4f} (client {stats['worst_client']}), worst 10 % {stats['worst10']:.4f}, best "
        f"{stats['best']:.4f} (client {stats['best_client']})"
    )
