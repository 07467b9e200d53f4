"""One local-training function, used by `train`, `baseline` and every client of `rounds`."""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedlora_cli import memory
from fedlora_cli.config import TrainSpec
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.features import TokenizedSplit, make_batches, steps_per_epoch
from fedlora_cli.progress import NullProgress, Progress, as_tracker


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over all steps
    last_loss: float  # mean over the last epoch's worth of steps (or fewer): where training ended
    steps: int
    examples: int  # distinct training examples (the client's FedAvg weight)
    samples_seen: int  # examples processed, over all epochs
    seconds: float
    real_tokens: int  # non-padding tokens processed
    padded_tokens: int  # tokens processed including padding (what the compute paid for)
    precision: str
    order_digest: str  # sha256 of the example order: shows that data order differs between runs
    peak_memory_mb: float | None = None  # CUDA only
    lr_range: tuple[float, float] | None = None  # the learning rate of the first and of the last step

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def padded_tokens_per_second(self) -> float:
        return self.padded_tokens / self.seconds if self.seconds > 0 else 0.0


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights stay fp32, matmuls run in bf16), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Modules of PEFT's adapter machinery: trainable (or trained when their slot is active), or copied when PEFT
# creates a slot (the head's `original_module`), so they keep their fp32 weights.
_ADAPTER_PARTS = (".lora_", "modules_to_save", "original_module")


def hold_frozen_weights(model: torch.nn.Module, precision: str) -> None:
    """Under bf16, keep the frozen Linear weights in bf16, once, instead of the fp32 originals.

    bf16 autocast casts every fp32 weight a matmul uses to bf16 at every call, and autograd keeps those
    copies until the backward pass: for roberta-base 170 MB of copies per step, plus the time to make them.
    A frozen weight's copy is the same at every step, so keeping it instead changes no result (the matmul
    sees the same bf16 values, bit for bit) and halves the weights' memory. Parameters that train (LoRA,
    the head, full fine-tuning) stay fp32: AdamW updates them. The other frozen tensors (embeddings,
    LayerNorm) are copied into memory of our own, so the model file that `from_pretrained` maps into
    memory is released instead of staying resident next to the bf16 copies. Idempotent; fp32 leaves the
    model as it is, but refuses a model that a bf16 run has converted (build a fresh one).
    """
    if getattr(model, "_fedlora_bf16_weights", False):
        if precision != "bf16":
            raise RuntimeError(
                "this model's frozen weights are held in bf16 for bf16 runs: build a fresh model"
            )
        return
    if precision != "bf16":
        return
    converted: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or any(part in f".{name}" for part in _ADAPTER_PARTS):
            continue
        if name.endswith("base_layer"):
            # The weights LoRA adapts stay fp32: a method may add a base delta to them between rounds
            # (exact aggregation, LoraModel.set_base_delta), which must start from the fp32 originals.
            continue
        own = list(module.named_parameters(recurse=False))
        if own and not any(p.requires_grad for _, p in own) and all(p.dtype == torch.float32 for _, p in own):
            for pname, p in own:
                setattr(module, pname, torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
                converted.add(id(getattr(module, pname)))
    for p in list(model.parameters()) + list(model.buffers()):
        if not p.requires_grad and id(p) not in converted and p.device.type == "cpu":
            p.data = p.data.clone()
    model._fedlora_bf16_weights = True


# The learning-rate shapes after warm-up. `train`/`baseline` run one schedule over their whole training;
# `rounds` runs either a fresh one every client turn (per-turn = linear, cosine, constant) or one over all
# rounds (global-*), of which each client's turn in round t trains on the t-th slice (`schedule_window`).
SHAPES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "per-turn": "linear",
    "global-linear": "linear",
    "global-cosine": "cosine",
}
GLOBAL_SCHEDULES = ("global-linear", "global-cosine")


def lr_factor(shape: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`, as a share of the peak.

    Linear warm-up to the peak over `warmup_steps`, then `linear` decay to zero (HF's default), `cosine`
    decay to zero, or `constant`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if shape == "constant":
        return 1.0
    if shape == "cosine":
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def linear_schedule(total_steps: int, warmup_steps: int):
    """Linear warmup to the peak learning rate, then linear decay to zero (as HF's default)."""
    return lambda step: lr_factor("linear", step, total_steps, warmup_steps)


def schedule_window(schedule: str, round_no: int, rounds: int, steps: int) -> tuple[int, int] | None:
    """Where a client's turn in round `round_no` of `rounds` sits in a global schedule: (first step, total
    steps), in the client's own steps per turn; None for a schedule that starts afresh every turn."""
    if schedule not in GLOBAL_SCHEDULES:
        return None
    return (round_no - 1) * steps, rounds * steps


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW's groups: decay matrices only; biases and LayerNorm weights (1-d) are not decayed, as in
    BERT/RoBERTa recipes."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


MAX_STEPS = 10_000_000  # optimizer steps of one training call: beyond this, a typo, not an experiment


def planned_steps(n_examples: int, spec: TrainSpec) -> int:
    """Optimizer steps for `spec.epochs` passes over `n_examples`; too many is one line, before any work."""
    steps = max(1, round(spec.epochs * steps_per_epoch(n_examples, spec.batch_size)))
    if steps > MAX_STEPS:
        raise InputError(
            f"--epochs {spec.epochs:g} over {n_examples:,} examples in batches of {spec.batch_size} is "
            f"{steps:,} optimizer steps, more than {MAX_STEPS:,}: lower --epochs or raise --batch-size"
        )
    return steps


def batch_stream(
    lengths: np.ndarray, indices: np.ndarray, spec: TrainSpec, rng: np.random.Generator, total_steps: int
) -> Iterator[np.ndarray]:
    """The batches of one training, in order: epoch after epoch of `make_batches`, `total_steps` of them.

    One client's data order is this stream from its own seed, whether it trains alone (`train_model`) or
    beside other clients (`federation.stacked`).
    """
    step = 0
    while step < total_steps:
        for idx in make_batches(
            lengths, indices, spec.batch_size, rng=rng, group_by_length=spec.group_by_length
        ):
            if step >= total_steps:
                return
            yield idx
            step += 1


def split_batch(idx: np.ndarray, lengths: np.ndarray, max_tokens: int | None) -> list[np.ndarray]:
    """The passes of one batch: as few as keep each under `max_tokens` padded tokens (one if None).

    Activation memory grows with the padded tokens of a pass (examples x longest example), so this
    bounds it whatever `--batch-size` and the sentence lengths are. Length-grouped batches come longest
    first, so later passes are padded less. An example longer than `max_tokens` is a pass of its own.
    """
    if max_tokens is None:
        return [idx]
    rows = max(1, max_tokens // int(lengths[idx].max()))  # examples per pass at the batch's width
    passes = math.ceil(len(idx) / rows)
    return [idx] if passes <= 1 else np.array_split(idx, passes)


def backward(model, data: TokenizedSplit, idx: np.ndarray, parts: list[np.ndarray], device, precision: str):
    """Forward and backward of one batch, pass by pass; returns the batch's mean loss (detached).

    Each pass's mean loss is weighted by its share of the batch, so the gradients add up to the whole
    batch's mean-loss gradient (up to float rounding, and dropout draws its masks pass by pass).
    """
    total = None
    for part in parts:
        batch = {k: v.to(device, non_blocking=True) for k, v in data.collate(part).items()}
        with autocast(device, precision):
            loss = model(**batch).loss
        if len(parts) > 1:
            loss = loss * (len(part) / len(idx))
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def tail_penalty(model: torch.nn.Module, keep: int, weight: float) -> Callable[[], torch.Tensor]:
    """HetLoRA's rank regulariser (Cho et al., 2024, §3, rank self-pruning):
    weight · Σ_modules ‖B[:, keep:]‖_F · ‖A[keep:, :]‖_F over the model's trainable LoRA factors, for
    `train_model(extra_loss=...)`. It pulls a client's last ranks toward zero, so that the server's pruning
    test (strategies/hetlora.py) can drop them."""
    found: dict[str, dict[str, torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        for part in ("lora_A", "lora_B"):
            if p.requires_grad and f".{part}." in name:
                found.setdefault(name.replace(f".{part}.", ".lora_*."), {})[part] = (
                    p  # paired per adapter slot
                )
    factors = [(f["lora_A"], f["lora_B"]) for f in found.values() if len(f) == 2]
    if not factors:
        raise FedloraError("the rank regulariser needs trainable LoRA A and B factors")

    def term() -> torch.Tensor:
        return weight * sum(b[:, keep:].norm() * a[keep:].norm() for a, b in factors)

    return term


def train_model(
    model: torch.nn.Module,
    data: TokenizedSplit,
    spec: TrainSpec,
    *,
    device: torch.device,
    precision: str,
    seed: int,
    indices: np.ndarray | None = None,
    progress: Progress | None = None,
    progress_key: str = "train",
    description: str = "training",
    prox_mu: float = 0.0,
    window: tuple[int, int] | None = None,
    on_epoch: Callable[[int], bool] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Fit the model's trainable parameters on `data[indices]` (all of it by default).

    The optimizer and schedule start fresh on every call (FedAvg clients do not carry optimizer
    state across rounds). `seed` fixes dropout and data order, so a call is reproducible on CPU.
    `prox_mu` > 0 adds FedProx's μ/2·‖θ − θ_start‖² over the trained parameters (θ_start: their
    values when the call begins, i.e. the broadcast global adapter); 0 adds nothing at all.
    `extra_loss`, if given, is a term added to every step's loss, gradient included (HetLoRA's rank
    regulariser, `tail_penalty`).
    `window` = (first step, total steps) places this call in a longer schedule (`schedule_window`): the
    learning rate follows `spec.lr_schedule` over the total, warm-up included; None: over this call.
    `on_epoch(epoch)` is called after each full epoch and after the last step; True stops training there
    (--early-stop), and the result then counts the steps actually taken.
    """
    progress = progress or NullProgress()
    tracker = as_tracker(progress)
    indices = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise FedloraError("no training examples: the client or task split is empty")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FedloraError("the model has no trainable parameters")

    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else None
    hold_frozen_weights(model, precision)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    per_epoch = steps_per_epoch(len(indices), spec.batch_size)
    total_steps = planned_steps(len(indices), spec)
    offset, span = window or (0, total_steps)
    warmup = math.floor(spec.warmup_ratio * span)
    shape = SHAPES[spec.lr_schedule]
    optimizer = torch.optim.AdamW(param_groups(params, spec.weight_decay), lr=spec.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(shape, offset + step, span, warmup)
    )
    lr_first = scheduler.get_last_lr()[0]
    lr_last = lr_first
    lengths = data.lengths
    order_hash = hashlib.sha256()

    model.train()
    cuda_memory = memory.PeakMemory(device, rss=False).start()  # nests inside a round's scope
    progress.start(progress_key, description, total=total_steps)
    losses = torch.zeros(total_steps, dtype=torch.float32)  # kept on CPU; one host sync per step below
    samples = real = padded = 0
    start = time.perf_counter()
    step = 0
    stop = False
    paused = 0.0  # seconds spent in on_epoch (evaluation): not training time
    for step, idx in enumerate(batch_stream(lengths, indices, spec, rng, total_steps), start=1):
        order_hash.update(idx.tobytes())
        parts = split_batch(idx, lengths, spec.max_tokens)
        loss = backward(model, data, idx, parts, device, precision)
        if anchors is not None:  # FedProx: its gradient adds to the batch's
            prox = prox_mu / 2 * sum((p - a).square().sum() for p, a in zip(params, anchors, strict=True))
            prox.backward()
            loss = loss + prox.detach()
        if extra_loss is not None:
            extra = extra_loss()
            extra.backward()
            loss = loss + extra.detach()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        lr_last = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # host sync: one per step, also catches divergence early
        if not math.isfinite(value):
            raise FedloraError(
                f"training diverged at step {step} (loss {value}): lower --learning-rate "
                f"or use --precision fp32"
            )
        losses[step - 1] = value
        samples += len(idx)
        real += int(lengths[idx].sum())
        padded += sum(len(part) * int(lengths[part].max()) for part in parts)
        progress.advance(progress_key, 1, info=f"loss {value:.4f}")
        lr = scheduler.get_last_lr()[0]  # the rate the next step will use
        tracker.log_metrics(
            step, {"train/loss": value, "train/learning_rate": lr, "train/epoch": step / per_epoch}
        )
        epoch_end = step % per_epoch == 0 or step == total_steps
        if total_steps > per_epoch and epoch_end:
            epoch = math.ceil(step / per_epoch)
            done = losses[(epoch - 1) * per_epoch : step]
            progress.log(
                f"{description}: epoch {epoch}/{math.ceil(total_steps / per_epoch)} · "
                f"loss {float(done.mean()):.4f} · {time.perf_counter() - start:.1f} s"
            )
        if on_epoch is not None and epoch_end:
            t = time.perf_counter()
            model.eval()
            stop = bool(on_epoch(math.ceil(step / per_epoch)))
            model.train()
            paused += time.perf_counter() - t
            if stop:
                break
    seconds = time.perf_counter() - start - paused
    progress.stop(progress_key)
    model.eval()

    losses = losses[:step]  # fewer than planned when on_epoch stopped it
    tail = losses[-min(per_epoch, step) :]
    peak = cuda_memory.stop()["cuda_peak_mb"]
    return TrainResult(
        loss=float(losses.mean()),
        last_loss=float(tail.mean()),
        steps=step,
        examples=len(indices),
        samples_seen=samples,
        seconds=seconds,
        real_tokens=real,
        padded_tokens=padded,
        precision=precision,
        order_digest=order_hash.hexdigest()[:16],
        peak_memory_mb=peak,
        lr_range=(lr_first, lr_last),
    )
