"""Several clients of a round trained at once (`--clients-at-once K`, engine local): their adapters stacked
over one pass of the frozen base (`stacked_lora`), each with what it would have alone.

A group's step concatenates each unfinished client's next batch (each from its own seed: exactly its
sequential data order), runs the base once over the rows, and gives each row its own client's LoRA factors
and head. Each client keeps its own loss (the mean over its own batch), FedProx term, gradient clipping,
AdamW, learning-rate schedule and dropout stream, and stops when its own steps are done; the others go on
without it. The reports are the `ClientReport`s `train_client` gives: with dropout 0 the same adapters, to
float rounding (the rows of a pass are padded to the widest client's batch, which changes no real token).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora_cli import memory, stacked_lora
from fedlora_cli.config import TrainSpec
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.features import TaskData, steps_per_epoch
from fedlora_cli.federation.client import client_report, client_window, train_client
from fedlora_cli.federation.driver import derive_seed
from fedlora_cli.modeling import LoraModel
from fedlora_cli.progress import NullProgress, Progress, as_tracker
from fedlora_cli.strategies.base import ClientPlan, ClientReport
from fedlora_cli.tasks import GlueTask
from fedlora_cli.training import (
    SHAPES,
    TrainResult,
    autocast,
    batch_stream,
    hold_frozen_weights,
    lr_factor,
    param_groups,
    planned_steps,
    split_batch,
)

Member = tuple[np.ndarray, ClientPlan]  # a client's shard indices and its plan


def groups(members: Sequence[Member], spec: TrainSpec, k: int) -> list[list[Member]]:
    """The round's clients in groups of at most `k`, trained together.

    Clients of a group share the frozen base, so its base delta (exact's) must be one; clients with as many
    steps go together, so few rows of a group idle while the others finish. Results do not depend on the
    grouping (to float rounding).
    """
    by_delta: dict[str, list[Member]] = {}
    for member in members:
        by_delta.setdefault(member[1].base_delta_key, []).append(member)
    out: list[list[Member]] = []
    for same in by_delta.values():
        same = sorted(same, key=lambda m: (-planned_steps(len(m[0]), spec), m[1].client_id))
        out += [same[i : i + k] for i in range(0, len(same), k)]
    return out


def train_clients_at_once(
    model: LoraModel,
    data: TaskData,
    members: Sequence[Member],
    train_spec: TrainSpec,
    *,
    round_no: int,
    run_seed: int,
    device: torch.device,
    precision: str,
    task: GlueTask | None = None,
    eval_batch_size: int = 64,
    progress: Progress | None = None,
    rounds: int | None = None,
) -> list[ClientReport]:
    """Train one group of a round's clients together; their reports, in the order of `members`.

    A group of one is `train_client` itself.
    """
    kwargs = dict(
        round_no=round_no,
        run_seed=run_seed,
        device=device,
        precision=precision,
        task=task,
        eval_batch_size=eval_batch_size,
        progress=progress,
        rounds=rounds,
    )
    if len(members) == 1:
        indices, plan = members[0]
        return [train_client(model, data, indices, plan, train_spec, **kwargs)]
    keys = {plan.base_delta_key for _, plan in members}
    if len(keys) > 1:
        raise ValueError(
            f"clients trained at once share one frozen base, but their base deltas differ: {keys}"
        )
    group = _Group(
        model,
        data,
        members,
        train_spec,
        round_no=round_no,
        run_seed=run_seed,
        rounds=rounds,
        device=device,
        precision=precision,
        progress=progress or NullProgress(),
    )
    results = group.train()
    reports = []
    for (_, plan), client, result in zip(members, group.clients, results, strict=True):
        model.apply_plan(plan)  # its slot, its start state and base delta; then what it trained
        stacked_lora.put(model.module, model.peft.active_adapter, client.adapter)
        reports.append(
            client_report(
                model,
                data,
                plan,
                result,
                client.seed,
                task=task,
                eval_batch_size=eval_batch_size,
                device=device,
                precision=precision,
            )
        )
    return reports


@dataclass
class _Client:
    """One client of a group: what `train_model` keeps for it, kept side by side."""

    plan: ClientPlan
    indices: np.ndarray
    seed: int
    total: int  # its optimizer steps this turn
    per_epoch: int
    adapter: stacked_lora.ClientAdapter
    batches: object = None  # its batch_stream
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    anchors: list[torch.Tensor] | None = None
    losses: torch.Tensor | None = None
    step: int = 0
    samples: int = 0
    real: int = 0
    padded: int = 0
    seconds: float = 0.0
    order: object = field(default_factory=hashlib.sha256)
    lr_first: float = 0.0
    lr_last: float = 0.0
    window: tuple[int, int] | None = None  # its place in a schedule over all rounds (client_window)

    @property
    def label(self) -> str:
        return f"client {self.plan.client_id}"


class _Group:
    def __init__(
        self,
        model: LoraModel,
        data: TaskData,
        members: Sequence[Member],
        spec: TrainSpec,
        *,
        round_no: int,
        run_seed: int,
        rounds: int | None,
        device: torch.device,
        precision: str,
        progress: Progress,
    ) -> None:
        self.model, self.data, self.spec = model, data, spec
        self.device, self.precision, self.progress = device, precision, progress
        self.round_no = round_no
        self.clients: list[_Client] = []
        for indices, plan in members:
            indices = np.asarray(indices, dtype=np.int64)
            if len(indices) == 0:
                raise FedloraError("no training examples: the client or task split is empty")
            model.apply_plan(plan)  # the first sets the (shared) base delta; each its own adapter slot
            try:
                adapter = stacked_lora.take(model.module, model.peft.active_adapter, plan.train)
            except ValueError as e:
                raise InputError(
                    f"--clients-at-once: {e}; train one client at a time (--clients-at-once 1)"
                ) from None
            total = planned_steps(len(indices), spec)
            client = _Client(
                plan,
                indices,
                derive_seed(run_seed, round_no, plan.client_id),
                total,
                steps_per_epoch(len(indices), spec.batch_size),
                adapter,
            )
            client.window = client_window(spec, round_no, rounds, len(indices))
            self.clients.append(client)
        self.stack = stacked_lora.Stack(
            [c.adapter for c in self.clients], [c.seed for c in self.clients], device
        )

    def _start_client(self, c: _Client) -> None:
        """As `train_model` starts: its parameters, anchors, AdamW, schedule and data order."""
        c.params = self.stack.parameters(self.clients.index(c))
        if not c.params:
            raise FedloraError("the model has no trainable parameters")
        if c.plan.prox_mu > 0:
            c.anchors = [p.detach().clone() for p in c.params]
        c.optimizer = torch.optim.AdamW(
            param_groups(c.params, self.spec.weight_decay), lr=self.spec.learning_rate
        )
        offset, span = c.window or (0, c.total)
        warmup = math.floor(self.spec.warmup_ratio * span)
        shape = SHAPES[self.spec.lr_schedule]
        c.scheduler = torch.optim.lr_scheduler.LambdaLR(
            c.optimizer, lambda step, o=offset, s=span, w=warmup: lr_factor(shape, o + step, s, w)
        )
        c.lr_first = c.lr_last = c.scheduler.get_last_lr()[0]
        c.batches = batch_stream(
            self.data.train.lengths, c.indices, self.spec, np.random.default_rng(c.seed), c.total
        )
        c.losses = torch.zeros(c.total, dtype=torch.float32)

    def train(self) -> list[TrainResult]:
        progress = self.progress
        tracker = as_tracker(progress)
        hf = self.model.module
        hold_frozen_weights(hf, self.precision)
        # Anything random outside the clients' own streams comes from the group's seed: reproducible.
        torch.manual_seed(int(np.random.SeedSequence([c.seed for c in self.clients]).generate_state(1)[0]))
        ids = ",".join(str(c.plan.client_id) for c in self.clients)
        description = f"round {self.round_no} · clients {ids}"
        longest = max(c.total for c in self.clients)
        cuda_memory = memory.PeakMemory(self.device, rss=False).start()
        with self.stack.swapped(hf):
            for c in self.clients:
                self._start_client(c)
            hf.train()
            progress.start("client", description, total=longest)
            start = time.perf_counter()
            for step in range(1, longest + 1):
                active = [c for c in self.clients if c.step < c.total]
                values = self._step(active)
                now = time.perf_counter()
                progress.advance(
                    "client", 1, info=f"loss {sum(values) / len(values):.4f} · {len(active)} at once"
                )
                tracker.log_metrics(
                    step,
                    {
                        "train/loss": sum(values) / len(values),
                        "train/learning_rate": active[0].scheduler.get_last_lr()[0],
                    },
                )
                for c in active:
                    if c.total > c.per_epoch and (c.step % c.per_epoch == 0 or c.step == c.total):
                        epoch = math.ceil(c.step / c.per_epoch)
                        done = c.losses[(epoch - 1) * c.per_epoch : c.step]
                        progress.log(
                            f"round {self.round_no} · {c.label}: epoch {epoch}/"
                            f"{math.ceil(c.total / c.per_epoch)} · loss {float(done.mean()):.4f} · "
                            f"{now - start:.1f} s"
                        )
            progress.stop("client")
            hf.eval()
        peak = cuda_memory.stop()["cuda_peak_mb"]
        results = []
        for c in self.clients:
            tail = c.losses[-min(c.per_epoch, c.total) :]
            results.append(
                TrainResult(
                    loss=float(c.losses.mean()),
                    last_loss=float(tail.mean()),
                    steps=c.total,
                    examples=len(c.indices),
                    samples_seen=c.samples,
                    seconds=c.seconds,
                    real_tokens=c.real,
                    padded_tokens=c.padded,
                    precision=self.precision,
                    order_digest=c.order.hexdigest()[:16],
                    peak_memory_mb=peak,
                    lr_range=(c.lr_first, c.lr_last),
                )
            )
        return results

    def _step(self, active: list[_Client]) -> list[float]:
        """One optimizer step of every active client: their batches through the base together
        (`plan_passes`)."""
        t0 = time.perf_counter()
        lengths = self.data.train.lengths
        slots = [self.clients.index(c) for c in active]
        batches = [next(c.batches) for c in active]
        sums = torch.zeros(len(active), dtype=torch.float32, device=self.device)
        padded = np.zeros(len(active), dtype=np.int64)
        for pass_ in plan_passes(batches, lengths, self.spec.max_tokens):
            segments, start = [], 0
            for j, part in pass_:
                segments.append(stacked_lora.Segment(slots[j], start, start + len(part)))
                start += len(part)
            self.stack.set_rows(segments)
            rows = np.concatenate([part for _, part in pass_])
            who = np.concatenate([np.full(len(part), j) for j, part in pass_])
            # each row counts 1/(its client's batch size): every client's loss is the mean over its own batch
            weight = np.concatenate([np.full(len(part), 1.0 / len(batches[j])) for j, part in pass_])
            batch = {
                k: v.to(self.device, non_blocking=True) for k, v in self.data.train.collate(rows).items()
            }
            labels = batch.pop("labels")
            w = torch.from_numpy(weight).to(self.device, torch.float32)
            with autocast(self.device, self.precision):
                logits = self.model.module(**batch).logits
                row_loss = _row_losses(logits, labels, self.model.module)
            weighted = row_loss.float() * w
            weighted.sum().backward()
            sums.index_add_(0, torch.from_numpy(who).to(self.device), weighted.detach())
            np.add.at(padded, who, int(lengths[rows].max()))
        losses = [sums[j] for j in range(len(active))]
        extra = []  # each client's own extra loss terms: their gradients add to its batch's
        for j, c in enumerate(active):
            if c.anchors is not None:  # FedProx, each against its own broadcast
                term = (
                    c.plan.prox_mu
                    / 2
                    * sum((p - a).square().sum() for p, a in zip(c.params, c.anchors, strict=True))
                )
                extra.append(term)
                losses[j] = losses[j] + term.detach()
            # HetLoRA's rank regulariser, where plans carry one (main's ClientPlan.tail_penalty / tail_from)
            penalty = getattr(c.plan, "tail_penalty", 0.0)
            if penalty > 0:  # λ·Σ_modules ‖B[:, k:]‖_F·‖A[k:, :]‖_F over its own factors (k = tail_from)
                pairs = self.stack.factors(self.clients.index(c))
                if not pairs:
                    raise FedloraError("the rank regulariser needs trainable LoRA A and B factors")
                keep = c.plan.tail_from
                term = penalty * sum(b[:, keep:].norm() * a[keep:].norm() for a, b in pairs)
                extra.append(term)
                losses[j] = losses[j] + term.detach()
        if extra:
            sum(extra).backward()
        for c in active:
            if self.spec.max_grad_norm > 0:  # its own norm, not the stack's
                torch.nn.utils.clip_grad_norm_(c.params, self.spec.max_grad_norm)
            c.lr_last = c.scheduler.get_last_lr()[0]
            c.optimizer.step()
            c.scheduler.step()
            c.optimizer.zero_grad(set_to_none=True)
        values = torch.stack(losses).tolist()  # host sync: one per step for the whole group
        seconds = time.perf_counter() - t0
        share = padded / max(1, padded.sum())
        for j, (c, idx) in enumerate(zip(active, batches, strict=True)):
            value = values[j]
            if not math.isfinite(value):
                raise FedloraError(
                    f"training diverged at step {c.step + 1} of {c.label} (loss {value}): lower "
                    "--learning-rate or use --precision fp32"
                )
            c.order.update(idx.tobytes())
            c.losses[c.step] = value
            c.step += 1
            c.samples += len(idx)
            c.real += int(lengths[idx].sum())
            c.padded += int(padded[j])
            c.seconds += seconds * float(share[j])  # the step's time, shared by padded tokens
        return values


PADDING_SLACK = 1.25  # a pass may compute this many times the tokens its clients' batches need alone


def plan_passes(
    batches: Sequence[np.ndarray], lengths: np.ndarray, max_tokens: int | None
) -> list[list[tuple[int, np.ndarray]]]:
    """The forward/backward passes of one step of several clients: lists of (client j, rows of its batch).

    A pass is padded to its widest row, and the clients' batches have different widths (each is
    length-grouped on its own), so batches of similar width share a pass: widest first, a batch joins the
    pass while the pass computes at most PADDING_SLACK times the tokens its batches need alone. On a CPU,
    where compute is the cost, this keeps the padding near what the clients pay one after another; the
    rows still go through the base in few, large passes. `--max-tokens` splits a batch first
    (`split_batch`) and caps every pass.
    """
    units = [(j, part) for j, idx in enumerate(batches) for part in split_batch(idx, lengths, max_tokens)]
    units.sort(key=lambda u: -int(lengths[u[1]].max()))  # stable: ties keep client order
    passes: list[list[tuple[int, np.ndarray]]] = []
    rows = own = width = 0
    for j, part in units:
        w = int(lengths[part].max())
        merged = (rows + len(part)) * width
        if (
            passes
            and merged <= PADDING_SLACK * (own + len(part) * w)
            and (max_tokens is None or merged <= max_tokens)
        ):
            passes[-1].append((j, part))
            rows, own = rows + len(part), own + len(part) * w
        else:
            passes.append([(j, part)])
            rows, own, width = len(part), len(part) * w, w
    return passes


def _row_losses(logits: torch.Tensor, labels: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Each row's loss, as the model's own mean loss counts it (regression: squared error; else
    cross-entropy)."""
    config = model.config
    if config.problem_type == "regression" or (config.problem_type is None and config.num_labels == 1):
        return torch.nn.functional.mse_loss(logits.view(-1), labels.view(-1), reduction="none")
    return torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none"
    )


# ---------------------------------------------------------------------------------------------------
# memory: how much a pass of K clients holds, before any training

SAFETY = 1.5  # the estimate times this must fit: the backward pass's temporaries come on top of it


@dataclass(frozen=True)
class MemoryEstimate:
    rows: int  # rows of the largest pass
    width: int  # its padded width (the longest training example)
    fixed_mb: float  # saved per pass whatever its size (weight copies under autocast)
    per_row_mb: float  # saved activations per row at that width (measured)
    available_mb: float | None
    where: str  # "RAM" or "free GPU memory"

    @property
    def total_mb(self) -> float:
        return self.fixed_mb + self.rows * self.per_row_mb

    def describe(self, k: int) -> str:
        have = (
            f"; {self.available_mb:,.0f} MB {self.where} available" if self.available_mb is not None else ""
        )
        return (
            f"clients at once: {k} · a pass holds up to {self.rows} rows × {self.width} tokens: about "
            f"{self.total_mb:,.0f} MB of activations ({self.per_row_mb:,.1f} MB a row, measured){have}"
        )


def estimate_memory(
    model: LoraModel, data: TaskData, spec: TrainSpec, k: int, device: torch.device, precision: str
) -> MemoryEstimate:
    """What autograd keeps for the backward pass of the largest pass of `k` clients' batches.

    Measured, not guessed: a forward of one and of two rows of the widest training example counts the
    bytes autograd saves (`saved_tensors_hooks`); the difference is a row's, the rest is per pass.
    `--max-tokens` bounds the rows of a pass as in training (`split_batch`).
    """
    lengths = data.train.lengths
    widest = int(np.argmax(lengths))
    width = int(lengths[widest])
    rows = k * spec.batch_size
    if spec.max_tokens is not None:
        rows = min(rows, max(1, spec.max_tokens // width))
    hf = model.module
    hold_frozen_weights(hf, precision)
    saved = [_saved_bytes(hf, data, np.full(n, widest), device, precision) for n in (1, 2)]
    per_row = max(0, saved[1] - saved[0])
    fixed = max(0, saved[0] - per_row)
    return MemoryEstimate(rows, width, fixed / 2**20, per_row / 2**20, *_available(device))


def _saved_bytes(hf: torch.nn.Module, data: TaskData, idx: np.ndarray, device, precision: str) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == device.type and not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    batch = {k: v.to(device) for k, v in data.train.collate(idx).items() if k != "labels"}
    was_training = hf.training
    hf.train()
    state = torch.get_rng_state()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, precision):
            hf(**batch).logits.float().sum()
    finally:
        torch.set_rng_state(state)
        hf.train(was_training)
    return sum(seen.values())


def _available(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20, "free GPU memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**10, "RAM"
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20, "RAM"
    except ImportError:
        return None, "RAM"


def check_memory(estimate: MemoryEstimate, k: int) -> None:
    """Refuse, before any training, a K whose passes would not fit (with the SAFETY factor)."""
    if estimate.available_mb is None or estimate.total_mb * SAFETY <= estimate.available_mb:
        return
    fit = max(1, int((estimate.available_mb / SAFETY - estimate.fixed_mb) / max(estimate.per_row_mb, 1e-9)))
    raise InputError(
        f"--clients-at-once {k}: a pass of {estimate.rows} rows × {estimate.width} tokens needs about "
        f"{estimate.total_mb:,.0f} MB of activations (×{SAFETY:g} for the backward pass), but "
        f"{estimate.available_mb:,.0f} MB {estimate.where} is available: use a smaller --clients-at-once, or "
        f"--max-tokens {fit * estimate.width} (passes of {fit} rows)"
    )
