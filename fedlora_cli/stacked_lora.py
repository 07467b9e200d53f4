"""Several clients' LoRA adapters over one frozen base: each row of a batch goes through its own client's
factors.

A batch of K clients is their batches one after another; a `Layout` says which rows are whose (contiguous
`Segment`s). While a `Stack` is swapped into a PEFT model, each LoRA layer is a `StackedLoraLinear` (the
frozen base layer once over every row, then each client's s_k·B_k·A_k on its own rows), each head
(PEFT's `modules_to_save`) a `StackedHead` (each client's own copy on its rows), and each dropout one
that draws a client's masks from that client's own random stream (`ClientStreams`), attention dropout
included. The base weights are shared with the model, never copied, so whatever the model's base carries
(exact's base delta) holds for every client.

Each client's factors are tensors of their own (its own rank, its own leaf parameters), so each client
has its own optimizer, clipping and schedule exactly as when it trains alone; a layer applies them with
one batched matmul (`torch.bmm` over the K × r × d stack) when the clients' row counts and ranks agree,
and client by client otherwise. Nothing here knows about rounds or strategies.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PARTS = ("A", "B", "head")


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a pass belong to client `client` (its position in the stack)."""

    client: int
    start: int
    stop: int


class ClientStreams:
    """One random stream per client, swapped into the device's default generator while its rows run.

    Dropout draws from the default generator; running a client's rows under its own stream gives it masks
    that depend on its seed alone (and on how wide the batch was padded), so a run is reproducible.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.generator = torch.cuda.default_generators[index]
        else:
            self.generator = torch.default_generator
        self.states = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(seed))
            self.states.append(g.get_state())

    @contextlib.contextmanager
    def use(self, client: int) -> Iterator[None]:
        saved = self.generator.get_state()
        self.generator.set_state(self.states[client])
        try:
            yield
        finally:
            self.states[client] = self.generator.get_state()
            self.generator.set_state(saved)


@dataclass
class Layout:
    """Which rows of the current pass are whose: set before every forward pass."""

    streams: ClientStreams
    segments: list[Segment] = field(default_factory=list)

    def per_client(self, x: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`fn(client, rows)` on each client's rows of `x` (dim 0), under the client's stream, in row
        order."""
        out = []
        for seg in self.segments:
            with self.streams.use(seg.client):
                out.append(fn(seg.client, x[seg.start : seg.stop]))
        return out[0] if len(out) == 1 else torch.cat(out)


class ClientDropout(nn.Module):
    """Dropout whose masks come from each client's own stream (`p` is read by attention modules too)."""

    def __init__(self, p: float, layout: Layout) -> None:
        super().__init__()
        self.p = p
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return self.layout.per_client(x, lambda _, rows: F.dropout(rows, self.p, True))


@dataclass
class Factors:
    """One client's LoRA factors of one layer: A (r × d_in), B (d_out × r), scaling s, dropout p."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float


class StackedLoraLinear(nn.Module):
    """The frozen base layer over every row, plus each row's own client's s·B·A (PEFT's lora.Linear,
    K-fold)."""

    def __init__(self, base_layer: nn.Module, factors: Sequence[Factors], layout: Layout) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Parameters over the clients' own tensors (same storage): training updates the ClientAdapters
        self.lora_A = nn.ParameterList([nn.Parameter(f.A, requires_grad=f.A.requires_grad) for f in factors])
        self.lora_B = nn.ParameterList([nn.Parameter(f.B, requires_grad=f.B.requires_grad) for f in factors])
        self.scaling = [f.scaling for f in factors]
        self.dropout = [f.dropout for f in factors]
        self.layout = layout

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.dropout[s.client] for s in self.layout.segments):
            return x
        return self.layout.per_client(x, lambda k, rows: F.dropout(rows, self.dropout[k], True))

    def _batched(self) -> bool:
        """One bmm over the stack: every client has as many rows in this pass, and the same rank."""
        segs = self.layout.segments
        sizes = {s.stop - s.start for s in segs}
        ranks = {self.lora_A[s.client].shape[0] for s in segs}
        return len(segs) > 1 and len(sizes) == 1 and len(ranks) == 1

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        x = self._input(x.to(self.lora_A[0].dtype))  # PEFT casts the input to the factors' dtype too
        segs = self.layout.segments
        if self._batched():
            g = len(segs)
            rows = x.reshape(g, -1, x.shape[-1])  # (K, rows·tokens, d_in): each client's rows together
            a = torch.stack([self.lora_A[s.client] for s in segs])  # (K, r, d_in)
            b = torch.stack([self.lora_B[s.client] for s in segs])  # (K, d_out, r)
            scalings = [self.scaling[s.client] for s in segs]
            scale = (  # one number for every client (alpha_i = s·r_i), or one per client
                scalings[0]
                if len(set(scalings)) == 1
                else torch.tensor(scalings, device=x.device, dtype=rows.dtype).view(g, 1, 1)
            )
            lora = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2)) * scale
            lora = lora.reshape(*x.shape[:-1], -1)
        else:
            parts = [
                F.linear(F.linear(x[s.start : s.stop], self.lora_A[s.client]), self.lora_B[s.client])
                * self.scaling[s.client]
                for s in segs
            ]
            lora = parts[0] if len(parts) == 1 else torch.cat(parts)
        return (result + lora).to(dtype)


class StackedHead(nn.Module):
    """Each client's own head (a copy of its PEFT `modules_to_save` module) on its own rows."""

    def __init__(self, heads: Sequence[nn.Module], layout: Layout) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.layout = layout

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.layout.per_client(x, lambda k, rows: self.heads[k](rows, *args, **kwargs))


# ---------------------------------------------------------------------------------------------------
# one client's adapter, taken out of (and put back into) a PEFT model


@dataclass
class ClientAdapter:
    """A client's adapter as tensors of its own: LoRA factors per layer name, a head copy per wrapper name."""

    factors: dict[str, Factors]
    heads: dict[str, nn.Module]
    trains: frozenset[str]  # the parts that train ("A", "B", "head"); the others stay bit-identical


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def head_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.utils import ModulesToSaveWrapper

    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def take(model: nn.Module, adapter_name: str, trains: frozenset[str]) -> ClientAdapter:
    """Copy the adapter slot `adapter_name` of a PEFT model out, as one client's own tensors."""
    from peft.tuners.lora import Linear

    factors: dict[str, Factors] = {}
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        if type(layer) is not Linear or adapter_name in getattr(layer, "lora_variant", {}):
            raise ValueError(
                f"{name} is a {type(layer).__name__} LoRA layer; stacking takes plain LoRA on Linear layers"
            )
        dropout = layer.lora_dropout[adapter_name]
        factors[name] = Factors(
            layer.lora_A[adapter_name].weight.detach().clone().requires_grad_("A" in trains),
            layer.lora_B[adapter_name].weight.detach().clone().requires_grad_("B" in trains),
            float(layer.scaling[adapter_name]),
            float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
        )
    heads = {}
    for name, wrapper in head_wrappers(model).items():
        head = copy.deepcopy(wrapper.modules_to_save[adapter_name])
        head.requires_grad_("head" in trains)
        heads[name] = head
    return ClientAdapter(factors, heads, frozenset(trains))


@torch.no_grad()
def put(model: nn.Module, adapter_name: str, client: ClientAdapter) -> None:
    """Write a client's trained tensors into the adapter slot `adapter_name` of a PEFT model (of its
    shape)."""
    layers = lora_layers(model)
    for name, f in client.factors.items():
        layers[name].lora_A[adapter_name].weight.copy_(f.A)
        layers[name].lora_B[adapter_name].weight.copy_(f.B)
    wrappers = head_wrappers(model)
    for name, head in client.heads.items():
        wrappers[name].modules_to_save[adapter_name].load_state_dict(head.state_dict())


# ---------------------------------------------------------------------------------------------------
# the stack


class Stack:
    """K clients' adapters over one model's frozen base; `swapped(model)` puts them in for a while.

    The stacked modules train the ClientAdapters' own tensors in place: `parameters(k)` lists client k's
    trainable ones (in the order a model lists a single adapter's) while the stack is swapped in.
    """

    def __init__(self, clients: Sequence[ClientAdapter], seeds: Sequence[int], device: torch.device) -> None:
        if len({tuple(c.factors) for c in clients}) != 1 or len({tuple(c.heads) for c in clients}) != 1:
            raise ValueError("the clients' adapters cover different modules")
        self.clients = list(clients)
        self.layout = Layout(ClientStreams(seeds, device))
        self._layers: dict[str, StackedLoraLinear] = {}
        self._heads: dict[str, StackedHead] = {}

    def set_rows(self, segments: list[Segment]) -> None:
        self.layout.segments = segments

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """The stacked modules in place of the model's LoRA layers, heads and dropouts; restored on exit."""
        originals: list[tuple[nn.Module, str, nn.Module]] = []

        def replace(name: str, new: nn.Module) -> None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)

        try:
            layers = lora_layers(model)
            for name in self.clients[0].factors:
                stacked = StackedLoraLinear(
                    layers[name].base_layer, [c.factors[name] for c in self.clients], self.layout
                )
                self._layers[name] = stacked
                replace(name, stacked)
            for name in self.clients[0].heads:
                self._heads[name] = StackedHead([c.heads[name] for c in self.clients], self.layout)
                replace(name, self._heads[name])
            ours = tuple(self._layers.values()) + tuple(self._heads.values())
            inside = {id(m) for o in ours for m in o.modules()}
            for name, module in list(model.named_modules()):
                if isinstance(module, nn.Dropout) and id(module) not in inside and module.p > 0:
                    replace(name, ClientDropout(module.p, self.layout))
            with _client_attention(self.layout):
                yield
        finally:
            for parent, child, original in reversed(originals):
                setattr(parent, child, original)
            self._layers, self._heads = {}, {}

    def factors(self, k: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Client k's (A, B) per layer where both train, while swapped in."""
        pairs = [(layer.lora_A[k], layer.lora_B[k]) for layer in self._layers.values()]
        return [(a, b) for a, b in pairs if a.requires_grad and b.requires_grad]

    def parameters(self, k: int) -> list[nn.Parameter]:
        """Client k's trainable tensors while swapped in: per layer A then B, then the head's."""
        out: list[nn.Parameter] = []
        for layer in self._layers.values():
            out += [p for p in (layer.lora_A[k], layer.lora_B[k]) if p.requires_grad]
        for head in self._heads.values():
            out += [p for p in head.heads[k].parameters() if p.requires_grad]
        return out


@contextlib.contextmanager
def _client_attention(layout: Layout) -> Iterator[None]:
    """Attention-probability dropout per client: transformers' attention functions run client by client
    (each under its client's stream) whenever they are asked for dropout; without dropout, as they are.

    transformers looks its attention function up by name at every call (`ALL_ATTENTION_FUNCTIONS`); this
    puts a per-client wrapper in front of each name for as long as the stack is in, and takes it away after.
    """
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # a transformers without the interface: dropout from the group's seed
        yield
        return
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    saved = dict(local)
    names = set(ALL_ATTENTION_FUNCTIONS.keys()) | {"eager"}
    try:
        for name in names:
            local[name] = _per_client_attention(
                layout, saved.get(name) or ALL_ATTENTION_FUNCTIONS._global_mapping.get(name)
            )
        yield
    finally:
        local.clear()
        local.update(saved)


def _per_client_attention(layout: Layout, inner: Callable | None) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, dropout: float = 0.0, **kwargs):
        fn = inner or sys.modules[type(module).__module__].eager_attention_forward  # the model's own eager
        if not dropout or len(layout.segments) < 2:
            if dropout and layout.segments:
                with layout.streams.use(layout.segments[0].client):
                    return fn(module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs)
            return fn(module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs)
        outs, weights = [], []
        for seg in layout.segments:
            rows = slice(seg.start, seg.stop)
            mask = attention_mask
            if mask is not None and mask.dim() > 0 and mask.shape[0] == query.shape[0]:
                mask = mask[rows]
            with layout.streams.use(seg.client):
                out, w = fn(
                    module, query[rows], key[rows], value[rows], mask, *args, dropout=dropout, **kwargs
                )
            outs.append(out)
            weights.append(w)
        return torch.cat(outs), (None if any(w is None for w in weights) else torch.cat(weights))

    return attention
