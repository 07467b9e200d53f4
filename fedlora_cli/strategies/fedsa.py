"""`fedsa`: FedSA-LoRA (Guo et al., ICLR 2025): A is shared and averaged; B and the head stay with each
client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedlora_cli.aggregation import ClientUpdate, normalise_weights
from fedlora_cli.strategies.base import Aggregated, GlobalAdapter, Strategy, part_of


class FedsaStrategy(Strategy):
    """FedSA-LoRA's split of the adapter: A learns what all clients share and is averaged by the server; B
    and the classification head learn what is each client's own and never leave it. A client's model is
    s·B_i·Ā plus its head h_i, and each client ends with its own (final/clients/client_NNN/adapter).

    Each client trains A, B and the head; it sends A only. The server averages A with the clients' example
    counts (`mean_rows`); B and the head of the global state stay at their initial values and are never
    sent after a client's first turn (the personal start). Works with partial participation (a client
    not selected keeps its B and head until its next turn) and with mixed ranks: row j of A is averaged
    over the clients whose rank exceeds j, and a client of rank r_i gets back the first r_i rows.

    Caveat: there is no global model to score on the dev split (with B at its start, s·B·Ā is zero); the run
    reports each client's own model on its local test split (--client-test-fraction) and --select best /
    --early-stop do not apply. The method's paper also keeps the head local, as here.
    """

    name = "fedsa"

    def aggregate(
        self,
        round_no: int,
        previous: GlobalAdapter | None,
        updates: Sequence[ClientUpdate],
        *,
        sampled: int | None = None,
    ) -> Aggregated:
        if previous is None:
            raise ValueError(
                "fedsa needs rounds: its clients keep B and the head, so there is nothing to merge"
            )
        state = dict(previous.state)
        state.update(mean_rows(updates, previous.state))
        record = {
            "method": self.name,
            "rank": previous.lora.r,
            "alpha": previous.lora.alpha,
            "error": None,
            "module_errors": {},
            "shared": sorted({part_of(k) for u in updates for k in u.state}),
        }
        return Aggregated(GlobalAdapter(state, previous.lora), record)


def mean_rows(
    updates: Sequence[ClientUpdate], previous: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The example-weighted mean of what the clients sent, row by row for LoRA A.

    For a LoRA A key (r_i x d_in per client, R x d_in in `previous`): row j is `Σ_{i: r_i > j} w_i A_i[j] /
    Σ_{i: r_i > j} w_i`, the mean over the clients that hold the row (with one rank for all, the plain mean
    Σ w_i A_i); a row no client of the round holds keeps its value in `previous`. Any other key: Σ w_i x_i,
    same shape for all. w_i = n_i / Σ n_j (examples); sums in float64, the result in `previous`' dtype.
    ValueError names the client and the key when keys or shapes disagree.
    """
    if not updates:
        raise ValueError("no clients to aggregate")
    keys = list(updates[0].state)
    weights = normalise_weights([u.weight for u in updates])
    out: dict[str, torch.Tensor] = {}
    for i, u in enumerate(updates):
        if set(u.state) != set(keys):
            raise ValueError(
                f"{u.name or f'client #{i + 1}'} sent other keys than {updates[0].name or 'client #1'}"
            )
    for key in keys:
        if key not in previous:
            raise ValueError(f"{key} is not part of the global adapter")
        old = previous[key]
        if ".lora_A." in key:
            acc = torch.zeros(old.shape, dtype=torch.float64)
            held = np.zeros(old.shape[0], dtype=np.float64)
            for i, (w, u) in enumerate(zip(weights, updates, strict=True)):
                a = u.state[key]
                if a.ndim != 2 or a.shape[1] != old.shape[1] or a.shape[0] > old.shape[0]:
                    raise ValueError(
                        f"{u.name or f'client #{i + 1}'}: {key} has shape {tuple(a.shape)}, the global "
                        f"{tuple(old.shape)}"
                    )
                acc[: a.shape[0]] += float(w) * a.detach().to("cpu", torch.float64)
                held[: a.shape[0]] += float(w)
            rows = torch.from_numpy(held)
            mean = torch.where(
                rows[:, None] > 0, acc / rows.clamp_min(1e-300)[:, None], old.to(torch.float64)
            )
            out[key] = mean.to(old.dtype).contiguous()
        else:
            acc = torch.zeros(old.shape, dtype=torch.float64)
            for i, (w, u) in enumerate(zip(weights, updates, strict=True)):
                if tuple(u.state[key].shape) != tuple(old.shape):
                    raise ValueError(
                        f"{u.name or f'client #{i + 1}'}: {key} has shape {tuple(u.state[key].shape)}, "
                        f"the global {tuple(old.shape)}"
                    )
                acc += float(w) * u.state[key].detach().to("cpu", torch.float64)
            out[key] = acc.to(old.dtype).contiguous()
    return out
