"""Personalised federated learning: each client ends with a model of its own, scored on data of its own.

`spec` declares the options (torch- and numpy-free: the CLI reads it), `split` carves each client's shard
into local train / local test, `stats` summarises a metric over clients (mean, std, worst, worst 10 %,
best). The rounds-time pieces (personal parts kept between turns, per-client evaluation, the final
per-client adapters) are in `federation/personal.py`; the methods are `strategies/fedsa.py` and
`strategies/local_only.py`.
"""
