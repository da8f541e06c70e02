"""Shared pieces of the Triton kernels: activation functions (and their derivatives) as @triton.jit helpers, an fp32
dot that stays IEEE-exact, and small host-side utilities (SM count, power-of-two sizes, grid limits, (rows, D)
views, AOT alignment attributes, the autotuning switch).

Nothing here runs at import time beyond defining functions; the SM count is queried lazily and cached.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from fastlm.backends import interpreter  # noqa: F401  (re-exported for the kernel modules)


def autotuning() -> bool:
    """Whether the autotuned Triton kernels (attention, the MLP GEMMs) time their candidate configurations on the
    first call of each new problem shape and keep the fastest: FASTLM_TRITON_AUTOTUNE=0 turns that off, and each
    kernel runs its default configuration for the shape (the first candidate its pruning keeps) with nothing timed.
    Read whenever a new shape arrives, so it can change within a process; the test suite sets it to 0 (and turns it
    on where a test is about autotuning), which keeps a first run on a GPU from timing every candidate of every
    shape."""
    value = os.environ.get("FASTLM_TRITON_AUTOTUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"FASTLM_TRITON_AUTOTUNE must be '0' or '1', got {value!r}")
    return value == "1"


def autotune(configs, key, prune):
    """triton.autotune over ``configs`` keyed by ``key``, pruned per shape by ``prune(configs, named_args, **kwargs)``,
    honouring autotuning(): when it is off the pruning keeps only its first survivor and that one is not timed."""
    def early_prune(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        return kept if autotuning() else kept[:1]

    def do_bench(kernel_call, quantiles):
        if not autotuning():  # a single survivor: nothing to choose between
            return [0.0] * len(quantiles)
        return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_prune},
                           do_bench=do_bench)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(int(n))


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _device_properties(device: torch.device):
    """A CUDA device's properties, queried once per device, on first use."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _device_properties(device).multi_processor_count


H200_SHARED_MEMORY = 232448  # bytes of shared memory a block may use on sm_90 (227 KB)


def shared_memory(device: torch.device) -> tuple[int, int]:
    """(bytes of shared memory a block may use, compute capability major) of a CUDA device; for the interpreter (CPU
    tensors) the H200's, the device the tiles are chosen for."""
    if device.type != "cuda":
        return H200_SHARED_MEMORY, 9
    props = _device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block), props.major


def num_programs(device: torch.device, per_sm: int = 4, cpu: int = 4) -> int:
    """A persistent-grid size: a few programs per SM on a GPU, a handful in the (sequential) interpreter."""
    if device.type != "cuda":
        return cpu
    return per_sm * sm_count(device)


MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions


def check_grid(kernel: str, **dims: int) -> None:
    """Sizes a kernel puts on the grid's second and third dimensions (heads, batch: the first, over sequence blocks,
    is the one with a 2^31 - 1 limit) must fit CUDA's 65535; ValueError naming them otherwise."""
    for name, n in dims.items():
        if n > MAX_GRID_YZ:
            raise ValueError(f"{kernel} (triton): {name} must be <= {MAX_GRID_YZ}, got {n}; split the call")


def rows2d(t: torch.Tensor) -> torch.Tensor:
    """t (..., D) as a contiguous (N, D) matrix (a copy only when the layout requires one); unlike
    reshape(-1, D) this also works for D == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]).contiguous()


def triton_dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


@triton.jit
def tanh(x):
    # tanh through the sigmoid: one exp, works the same compiled and in the interpreter
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def gelu_tanh(x):
    """GELU with the tanh approximation (GPT-2), fp32 in and out; 0.79788... = sqrt(2 / pi)."""
    t = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1.0 + t)


@triton.jit
def gelu_tanh_and_grad(x):
    """(gelu_tanh(x), d gelu_tanh / dx), sharing the tanh."""
    x2 = x * x
    t = tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
    y = 0.5 * x * (1.0 + t)
    dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    return y, dy


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def dot_acc(a, b, acc):
    """acc + a @ b with fp32 accumulation; fp32 operands use IEEE products (tf32 would break the numerics rule)."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def aligned(fn, *names) -> dict:
    """ASTSource attrs marking arguments as multiples of 16 (pointers 16-byte aligned, sizes divisible by 16), the
    specialization Triton applies at run time to such values, so ahead-of-time reports compile the common case."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}
