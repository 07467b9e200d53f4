"""Memory: frozen weights held in bf16 change no result, kernel caches stay bounded, peaks are measured."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fedlora_cli import memory, training
from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec, TrainSpec
from fedlora_cli.evaluation import evaluate
from fedlora_cli.features import load_task_data
from fedlora_cli.modeling import LoraModel, load_base_model, load_tokenizer
from fedlora_cli.tasks import get_task

CPU = torch.device("cpu")
SHORT = TrainSpec(epochs=1, learning_rate=1e-2, batch_size=32, precision="bf16")


@pytest.fixture(scope="module")
def sst2(tiny_model, glue_dir):
    spec = ModelSpec(str(tiny_model))
    return spec, load_task_data(DataSpec("sst2", str(glue_dir), max_eval_samples=100), load_tokenizer(spec))


def _lora(spec):
    return LoraModel(load_base_model(spec, get_task("sst2"), 0), LoraSpec(), CPU)


def _train_and_eval(spec, data):
    model = _lora(spec)
    result = training.train_model(model.module, data.train, SHORT, device=CPU, precision="bf16", seed=3,
                                  indices=np.arange(200))  # fmt: skip
    metrics = evaluate(model.module, get_task("sst2"), data.evals, 64, CPU, "bf16").metrics
    return model, result, metrics


def test_bf16_weights_held_once_give_bit_identical_training_and_evaluation(sst2, monkeypatch):
    spec, data = sst2
    held, r1, m1 = _train_and_eval(spec, data)
    with monkeypatch.context() as m:  # what autocast did before: cast the fp32 weights at every matmul
        m.setattr(training, "hold_frozen_weights", lambda model, precision: None)
        cast, r2, m2 = _train_and_eval(spec, data)
    assert r1.loss == r2.loss and r1.last_loss == r2.last_loss and m1 == m2
    s1, s2 = held.state(), cast.state()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)

    dtypes = {name: p.dtype for name, p in held.module.named_parameters()}
    frozen_linears = [n for n in dtypes if ".intermediate.dense." in n or ".attention.self.key." in n]
    assert frozen_linears and all(dtypes[n] == torch.bfloat16 for n in frozen_linears)
    # the weights LoRA adapts stay fp32: a method may add a base delta to them (exact aggregation)
    adapted = [n for n in dtypes if n.endswith("base_layer.weight")]
    assert adapted and all(dtypes[n] == torch.float32 for n in adapted)
    # what trains, and PEFT's head original (copied when a slot is created), stays fp32
    for name, p in held.module.named_parameters():
        if p.requires_grad or "original_module" in name or "embeddings" in name or "LayerNorm" in name:
            assert p.dtype == torch.float32, name


def test_a_new_adapter_slot_on_a_bf16_model_trains_in_fp32(sst2):
    spec, data = sst2
    model, _, _ = _train_and_eval(spec, data)
    other = LoraSpec(r=4, alpha=8)
    model.activate(other)
    trainable = [(n, p.dtype) for n, p in model.module.named_parameters() if p.requires_grad]
    assert trainable and all(dtype == torch.float32 for _, dtype in trainable), trainable
    training.train_model(model.module, data.train, SHORT, device=CPU, precision="bf16", seed=1,
                         indices=np.arange(64))  # fmt: skip


def test_a_bf16_model_refuses_fp32(sst2):
    spec, data = sst2
    model, _, _ = _train_and_eval(spec, data)
    with pytest.raises(RuntimeError, match="build a fresh model"):
        training.train_model(model.module, data.train, SHORT, device=CPU, precision="fp32", seed=1)


def test_fp32_leaves_the_model_alone(sst2):
    spec, _ = sst2
    model = _lora(spec)
    before = {n: p.data_ptr() for n, p in model.module.named_parameters()}
    training.hold_frozen_weights(model.module, "fp32")
    assert before == {n: p.data_ptr() for n, p in model.module.named_parameters()}


def test_peak_memory_sees_a_short_allocation_and_reports_the_keys_history_uses():
    with memory.PeakMemory(interval=0.001) as peak:
        block = np.ones(300 * 2**20 // 8)  # 300 MB, touched
        del block
    summary = peak.summary()
    assert set(summary) == {"peak_rss_mb", "rss_mb", "cuda_peak_mb"} and summary["cuda_peak_mb"] is None
    if summary["rss_mb"] is None:
        pytest.skip("no RSS on this platform")
    assert summary["peak_rss_mb"] >= summary["rss_mb"] + 250
    assert memory.process_peak_rss_mb() >= summary["peak_rss_mb"] - 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_gives_free_heap_pages_back():
    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MB in the heap, below the mmap threshold
    keep = blocks[-1]  # the top of the heap stays in use, so glibc cannot shrink the heap by itself
    del blocks
    before = memory.rss_mb()
    memory.release()
    assert before - memory.rss_mb() > 100
    del keep


_SHAPES = """
import os, sys, ctypes
{setup}
import torch
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI
lin = torch.nn.Linear(256, 256).requires_grad_(False)
def step(n):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(torch.randn(n, 256))
step(1)
before = libc.mallinfo2().uordblks
for n in range(2, 300):
    step(n)  # every batch a new shape, as dynamic padding makes them
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 is glibc's")
def test_kernel_caches_stay_bounded_when_every_batch_has_a_new_shape():
    """The cause of memory growing with the number of clients: oneDNN's per-shape kernel caches."""

    def grown(setup: str) -> float:
        code = textwrap.dedent(_SHAPES.format(setup=setup))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    default = grown(
        "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'] = os.environ['LRU_CACHE_CAPACITY'] = '1024'"
    )
    if default < 20:
        pytest.skip(f"this CPU's bf16 matmuls do not cache kernels per shape (+{default:.0f} MB)")
    bounded = grown("import fedlora_cli.modeling")  # what every fedlora process does first
    assert bounded < default / 3, (bounded, default)


def test_cuda_peaks_nest_a_clients_reset_does_not_lose_the_rounds_peak(monkeypatch):
    """train_model resets CUDA's peak counter for its own peak; the round's scope still sees the max."""
    state = {"now": 100.0, "peak": 100.0}  # MiB, a fake CUDA allocator

    def allocate(mb):
        state["now"] += mb
        state["peak"] = max(state["peak"], state["now"])
        state["now"] -= mb

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"] * 2**20)
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["now"])
    )
    gpu = torch.device("cuda", 0)
    round_scope = memory.PeakMemory(gpu, rss=False).start()
    allocate(500)  # the round's biggest moment: before the client
    with memory.PeakMemory(gpu, rss=False) as client:
        allocate(200)
    assert client.summary()["cuda_peak_mb"] == 300
    assert round_scope.stop() == {"peak_rss_mb": None, "rss_mb": None, "cuda_peak_mb": 600}
