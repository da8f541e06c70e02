"""The benchmark harness behind ``python -m fastlm bench`` and the pytest-benchmark suites in bench/.

What a figure here means:
- Work is counted by explicit functions (attention_flops, gemm_flops, mlp_flops, bytes for memory-bound ops), so a
  time becomes a rate (FLOP/s or bytes/s), and the rate a fraction of a ceiling measured on this device (a large
  GEMM in the case's dtype; a large tensor copy, bytes read + written): at the start of the run, and on a CPU again
  in each case's rotation, whose figure the % of ceiling then refers to (a shared machine's rates drift by 10-30 %
  within minutes). On a CPU a memory-bound op's ceiling in the rotation is a read (sum) of as many bytes from as
  many input sets as its calls cycle through: the caches then hold as much of its data as of the case's.
- Times are medians of many calls after warm-up: CUDA events with an L2 flush before each call on a GPU; on a CPU
  wall-clock per call, cycling through input sets of about 96 MB in all (more than most CPUs' last-level cache; a
  server's can hold hundreds of MB, and the read ceiling above then finds the same caches as the case does), with
  the implementations of a case called in rotation (one call of each per round, in a shuffled order), so that a
  change in the speed of a shared machine during the measurement hits fastlm and its peers alike, and none always
  runs right after the same other one.
  Inputs are random normal (never zeros or ones); on a CPU the thread count is fixed and recorded.
- Every measured implementation is first checked against the float64 reference by the numerics rule
  (fastlm.testing): a result that fails it is marked WRONG in the table and the JSON, so speed is never shown for a
  wrong answer without saying so.
- Peers run in the same process on the same inputs: the plain reference (eager), scaled_dot_product_attention,
  torch.compile of the reference, transformers' model, Liger-Kernel when importable.
- The Triton interpreter is never timed: on a CPU the fastlm backends measured are "cpu" (C++ extension; "torch"
  when the extension does not serve the op), on a GPU "triton" and "cuda".

The case lists live in fastlm.bench_suites; bench/ (pytest-benchmark) parametrizes over the same lists.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastlm import testing

SCHEMA = "fastlm-bench/1"
OPS = ("attention", "decode", "model", "ffn", "cross_entropy", "norm", "rope")   # most important first
CPU_QUICK_OPS = ("attention", "decode", "model", "ffn")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# ----------------------------------------------------------------------------------------------------------------------
# Work counts
# ----------------------------------------------------------------------------------------------------------------------

def causal_pairs(seqlen_q: int, seqlen_k: int) -> int:
    """Number of (query, key) pairs a bottom-right aligned causal mask keeps: query i sees keys 0..i + Sk - Sq."""
    first = max(0, seqlen_q - seqlen_k)                  # queries before this one see no key
    count = seqlen_q - first
    return (first + seqlen_k - seqlen_q + 1 + seqlen_k) * count // 2


def attention_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, *, causal: bool = False,
                    mode: str = "fwd") -> float:
    """FlashAttention's count: 4 * B * H * Sq * Sk * D for the two matmuls of the forward (softmax not counted).

    Causal with Sq == Sk counts half of that, as FlashAttention's and Triton's benchmarks do, so rates compare with
    published figures. Causal with Sq != Sk counts exactly the unmasked pairs (bottom-right alignment).
    Backward = 2.5 x forward (five matmuls instead of two); "fwd_bwd" = 3.5 x forward."""
    if causal:
        pairs = seqlen_q * seqlen_k / 2 if seqlen_q == seqlen_k else causal_pairs(seqlen_q, seqlen_k)
    else:
        pairs = seqlen_q * seqlen_k
    fwd = 4.0 * batch * nheads * pairs * headdim
    return fwd * _MODE_FACTOR[mode]


_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def gemm_flops(m: int, n: int, k: int) -> float:
    """(m x k) @ (k x n): one multiply and one add per term."""
    return 2.0 * m * n * k


def mlp_flops(tokens: int, d_model: int, intermediate: int, kind: str, *, mode: str = "fwd") -> float:
    """GEMM FLOPs of the MLP (the activation's elementwise work is not counted): GELU has two GEMMs (fc, proj),
    SwiGLU three (gate, up, down). Backward needs two GEMMs per forward GEMM (dX and dW)."""
    ngemm = {"gelu": 2, "swiglu": 3}[kind]
    fwd = ngemm * gemm_flops(tokens, intermediate, d_model)
    return fwd * {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}[mode]


def mlp_bytes(tokens: int, d_model: int, intermediate: int, kind: str, itemsize: int) -> float:
    """Bytes a fused MLP forward must move at least when the weights dominate (a decode step's few tokens): every
    weight and bias once, x and the residual read, the output written (the hidden activation need not leave chip)."""
    weights = {"gelu": 2 * d_model * intermediate + intermediate + d_model, "swiglu": 3 * d_model * intermediate}[kind]
    return float((weights + 3 * tokens * d_model) * itemsize)


def elementwise_bytes(numel_read: int, numel_written: int, itemsize: int) -> float:
    """Bytes a memory-bound op must move at least: every input element read once, every output written once."""
    return float((numel_read + numel_written) * itemsize)


def decode_bytes(batch: int, context: int, nheads: int, nheads_kv: int, headdim: int, itemsize: int,
                 seqlen_q: int = 1) -> float:
    """Bytes decode attention must move: the K and V cache up to ``context`` once per kv head, q in, out out."""
    kv = 2 * batch * context * nheads_kv * headdim
    qo = 2 * batch * seqlen_q * nheads * headdim
    return float((kv + qo) * itemsize)


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Budget of one measurement: warm-up time, target timed time, and bounds on the number of timed calls."""
    warmup_s: float = 0.05
    budget_s: float = 0.3
    min_reps: int = 3
    max_reps: int = 50


QUICK_CPU, QUICK_GPU = Timing(0.05, 0.25, 5, 30), Timing(0.05, 0.15, 10, 200)
FULL_CPU, FULL_GPU = Timing(0.2, 1.0, 5, 100), Timing(0.1, 0.5, 20, 1000)
TINY = Timing(0.0, 0.01, 2, 3)


def timing_for(suite: str, device: torch.device, tiny: bool = False) -> Timing:
    if tiny:
        return TINY
    gpu = device.type == "cuda"
    return {("quick", False): QUICK_CPU, ("quick", True): QUICK_GPU, ("full", False): FULL_CPU,
            ("full", True): FULL_GPU}[(suite, gpu)]


class L2Flush:
    """Writes a buffer larger than the GPU's L2 cache before each timed call, so inputs are read from HBM."""

    def __init__(self, device):
        self.buf = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self):
        self.buf.zero_()


def time_fns(fns: list[Callable], device: torch.device, timing: Timing) -> dict:
    """Median time (s) of calls cycling through ``fns`` (one closure per input set), after warm-up.

    GPU: CUDA events around each call, L2 flushed before each. CPU: perf_counter around each call (time_rotation
    with one implementation)."""
    if device.type != "cuda":
        (stats,) = time_rotation([fns], timing)
        if isinstance(stats, Exception):
            raise stats
        return stats
    flush, sync = L2Flush(device), torch.cuda.synchronize
    for fn in fns:                                       # compile / autotune / first-touch happen here
        fn()
    sync()
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < timing.warmup_s:
        fns[i % len(fns)]()
        i += 1
        sync()
    events = []
    start = time.perf_counter()
    n = 0
    while n < timing.min_reps or (n < timing.max_reps and time.perf_counter() - start < timing.budget_s):
        flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fns[n % len(fns)]()
        b.record()
        events.append((a, b))
        n += 1
        if n % 16 == 0:
            sync()                                       # keep the host from running far ahead of the budget
    sync()
    return _stats([a.elapsed_time(b) / 1e3 for a, b in events])


def _stats(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "q1_s": q[0], "q3_s": q[2],
            "reps": len(times)}


def time_rotation(fn_lists: list[list[Callable]], timing: Timing, companion: list[Callable] | None = None) -> list:
    """CPU: several implementations timed in rotation, one call of each per round in a shuffled order (each cycling
    through its own closures, one per input set), after the same warm-up; the budget is ``timing``'s per
    implementation: each leaves the rotation once it has min_reps calls and either max_reps or budget_s of timed
    time. Returns, per implementation, time_fns' statistics or the exception one of its calls raised (it then
    leaves the rotation; the others go on). ``companion`` (the closures of a ceiling kernel) takes part in every
    round while an implementation is left (up to max_reps calls); its statistics come last."""
    fn_lists = fn_lists + ([companion] if companion else [])
    n_impls = len(fn_lists) - (1 if companion else 0)
    out: list = [None] * len(fn_lists)
    times: list[list[float]] = [[] for _ in fn_lists]
    live = list(range(len(fn_lists)))

    def call(j: int, n: int) -> None:
        try:
            t = time.perf_counter()
            fn_lists[j][(n + j) % len(fn_lists[j])]()     # (+ j: within a round, each reads another set)
            times[j].append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the others' measurement
            out[j] = e
            live.remove(j)

    def running() -> bool:
        return any(j < n_impls for j in live)

    def wants_more(j: int) -> bool:
        """Each implementation's own budget: a slow peer stops at min_reps without cutting a fast one short."""
        done = len(times[j])
        return done < timing.min_reps or (done < timing.max_reps and sum(times[j]) < timing.budget_s)

    for j in list(live):                                 # compile / first-touch happen here
        for n in range(len(fn_lists[j])):
            if j in live:
                call(j, n)
    # each round in its own order: a call that follows one writing tens of MB (an eager peer's temporaries, the
    # ceiling's copy) finds the memory system busy, and a fixed order would charge that to the same implementation
    # every time
    order = random.Random(0)

    def one_round(n: int, wanted=lambda j: True) -> None:
        for j in order.sample(live, len(live)):
            if j in live and wanted(j):
                call(j, n)

    t0, n = time.perf_counter(), 0
    while running() and time.perf_counter() - t0 < timing.warmup_s * len(fn_lists):
        one_round(n)
        n += 1
    times = [[] for _ in fn_lists]
    n = 0
    while running():
        # (the ceiling's companion is timed while an implementation is, up to max_reps calls)
        one_round(n, lambda j: wants_more(j) if j < n_impls else len(times[j]) < timing.max_reps)
        live[:] = [j for j in live if j >= n_impls or wants_more(j)]
        n += 1
    return [out[j] if out[j] is not None else _stats(times[j]) if times[j] else RuntimeError("never timed")
            for j in range(len(fn_lists))]


# ----------------------------------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------------------------------

class CeilingKernels:
    """The kernels that define the ceilings: a large GEMM per dtype in nn.Linear's layout (x @ W^T, the GEMMs models
    run; torch's CPU bf16 path for x @ W is much slower) and a large fp32 tensor copy (64 MiB on a CPU: more than
    most CPUs' last-level cache, not a server's hundreds of MiB). Their inputs are made once: measure_ceilings times
    them at the start of a run, and on a CPU run_impls times the one that defines a case's ceiling in the case's
    rotation (the shared machine's rates drift within minutes); a memory-bound op case's ceiling is a read of its
    own byte count instead (read)."""

    def __init__(self, device: torch.device, *, tiny: bool = False):
        cuda = device.type == "cuda"
        self.device, self.n = device, 256 if tiny else (8192 if cuda else 1536)
        self._gen = torch.Generator(device=device).manual_seed(0)
        self._gemm: dict = {}
        numel = 2**18 if tiny else (2**28 if cuda else 2**24)     # 1 GiB on GPU, 64 MiB on CPU, fp32
        src = torch.randn(numel, device=device, generator=self._gen)
        dst = torch.empty_like(src)
        self._copy = [lambda: dst.copy_(src)]
        self.copy_bytes = 2 * numel * src.element_size()          # read + write

    def gemm(self, dtype) -> list[Callable]:
        """Closures of an n x n x n GEMM in ``dtype`` (two input sets on a CPU, one on a GPU)."""
        if dtype not in self._gemm:
            n = self.n
            sets = [(torch.randn(n, n, device=self.device, generator=self._gen).to(dtype),
                     torch.randn(n, n, device=self.device, generator=self._gen).to(dtype))
                    for _ in range(1 if self.device.type == "cuda" else 2)]
            self._gemm[dtype] = [lambda a=a, b=b: torch.nn.functional.linear(a, b) for a, b in sets]
        return self._gemm[dtype]

    def copy(self) -> list[Callable]:
        """The closure of the fp32 copy."""
        return self._copy

    def read(self, nbytes: float, n_sets: int) -> list[Callable]:
        """Closures summing ``n_sets`` fp32 buffers of ``nbytes`` bytes each (made now, one per call's input set):
        the memory ceiling of a memory-bound op case on a CPU. A read of as many bytes from as many sets, timed in the
        case's rotation, finds the caches as the case's own calls do: its working set can sit partly in a large
        last-level cache (480 MiB on some servers) where the 64 MiB copy's does too, however different their
        sizes."""
        numel = max(1, math.ceil(nbytes / 4))
        bufs = [torch.randn(numel, device=self.device, generator=self._gen) for _ in range(n_sets)]
        return [lambda b=b: b.sum() for b in bufs]


def measure_ceilings(device: torch.device, dtypes, timing: Timing, *, tiny: bool = False,
                     kernels: CeilingKernels | None = None) -> dict:
    """Rates this device reaches through PyTorch, measured now: a large GEMM per dtype (FLOP/s) and a large
    tensor copy (bytes read + written per second), by ``kernels`` (made here when not given).

    ``compute_flop_per_s`` is the compute ceiling a dtype's % of ceiling refers to: its GEMM rate, except for
    bf16/fp16 on a CPU, where it is the larger of that and the fp32 rate: widening half-precision operands to fp32
    is exact, so fp32 arithmetic is a way to compute in bf16/fp16 that the device offers (fastlm's CPU kernels use
    it), and on a CPU without native half-precision products it is the fastest one. ``compute_gemm_dtype`` names,
    per dtype, the GEMM that rate came from."""
    cuda = device.type == "cuda"
    kernels = kernels or CeilingKernels(device, tiny=tiny)
    n = kernels.n
    if not cuda and any(dt in (torch.bfloat16, torch.float16) for dt in dtypes):
        dtypes = sorted(set(dtypes) | {torch.float32}, key=str)
    matmul = {}
    for dt in dtypes:
        t = time_fns(kernels.gemm(dt), device, timing)["median_s"]
        matmul[str(dt).replace("torch.", "")] = gemm_flops(n, n, n) / t
    t = time_fns(kernels.copy(), device, timing)["median_s"]
    compute, source = dict(matmul), {k: k for k in matmul}
    if not cuda:
        for half in ("bfloat16", "float16"):
            if half in compute and matmul["float32"] > compute[half]:
                compute[half], source[half] = matmul["float32"], "float32"
    return {"matmul_flop_per_s": matmul, "compute_flop_per_s": compute, "compute_gemm_dtype": source,
            "copy_bytes_per_s": kernels.copy_bytes / t, "matmul_n": n, "copy_bytes": kernels.copy_bytes}


# ----------------------------------------------------------------------------------------------------------------------
# Cases, implementations, results
# ----------------------------------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """The implementation cannot run here (backend not built, op not implemented, peer not installed)."""


@dataclass
class Impl:
    """One implementation measured in a case. ``fn(**inputs)`` returns a tensor or a tuple of tensors.
    kind: "fastlm" (what is being measured) or "peer" (what it is compared against)."""
    name: str
    kind: str
    fn: Callable
    backend: str | None = None
    fallback: "Impl | None" = None      # run instead when this backend is unavailable here (default choice only)
    compiled: bool = False              # torch.compile'd: checking it at another shape would compile it twice
    # "fwd" cases: the inputs as this implementation takes them (a peer's own layout or dtype), made once per input
    # set outside the timed calls, as a user of it would hold them; fn takes them and returns fastlm's layout
    convert: Callable | None = None
    cuda_graph: bool = False            # a model's decode step captured in a CUDA graph (generate(cuda_graph=True))

    def converted(self, inputs: dict, mode: str) -> dict:
        if self.convert is None:
            return inputs
        if mode != "fwd":   # (converted tensors would be the gradients' leaves: another layout or dtype)
            raise ValueError(f"{self.name}: an Impl's convert serves forward cases only, got mode {mode!r}")
        return self.convert(inputs)


@dataclass
class Result:
    op: str
    case: str
    shape: dict
    dtype: str
    mode: str
    impl: str
    kind: str
    backend: str | None = None
    status: str = "ok"                  # ok | wrong | error | unavailable | skipped
    message: str = ""
    median_s: float | None = None
    min_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    reps: int = 0
    flops: float | None = None
    bytes: float | None = None
    tokens: float | None = None
    flop_per_s: float | None = None
    bytes_per_s: float | None = None
    tokens_per_s: float | None = None
    bound: str = "compute"              # which ceiling the rate is a fraction of: compute (matmul) | memory
    ceiling: float | None = None        # that ceiling's rate (FLOP/s or bytes/s) ...
    ceiling_in_rotation: bool = False   # ... measured in the case's rotation (CPU), else at the start of the run
    ceiling_kernel: str | None = None   # what was timed in the rotation (rotation_ceiling)
    pct_ceiling: float | None = None
    max_err: float | None = None
    ref_err: float | None = None        # PyTorch's own error at this dtype (the rule allows twice it)
    correct: bool | None = None
    check: str = ""                     # what the error figure compares
    peak_mem_bytes: int | None = None
    speedup: dict = field(default_factory=dict)

    def finish(self, stats: dict, ceilings: dict | None, in_rotation: float | None = None):
        """Times and rates from ``stats``; % of ceiling against ``in_rotation`` (the rate of the ceiling kernel timed
        in the case's rotation) when given, else against the run's ``ceilings``."""
        for key in ("median_s", "min_s", "q1_s", "q3_s", "reps"):
            setattr(self, key, stats[key])
        t = self.median_s
        if self.flops:
            self.flop_per_s = self.flops / t
        if self.bytes:
            self.bytes_per_s = self.bytes / t
        if self.tokens:
            self.tokens_per_s = self.tokens / t
        rate = self.flop_per_s if self.bound == "compute" else self.bytes_per_s
        if in_rotation:
            self.ceiling, self.ceiling_in_rotation = in_rotation, True
        elif ceilings:
            self.ceiling = (ceilings["compute_flop_per_s"].get(self.dtype) if self.bound == "compute"
                            else ceilings["copy_bytes_per_s"])
        if rate and self.ceiling:
            self.pct_ceiling = 100.0 * rate / self.ceiling


@dataclass
class Context:
    """Everything a case needs to run: device, timing budget, ceilings, options."""
    device: torch.device
    timing: Timing
    ceilings: dict | None = None
    ceiling_kernels: CeilingKernels | None = None   # CPU: timed in each case's rotation (run_impls)
    compile: bool = True
    tiny: bool = False
    suite: str = "quick"
    interrupted: bool = False


def _originates_in_backends(exc: BaseException) -> bool:
    tb = traceback.extract_tb(exc.__traceback__)
    return bool(tb) and tb[-1].filename.endswith(os.path.join("fastlm", "backends.py"))


def failure(exc: BaseException) -> tuple[str, str]:
    """(status, message) of a measurement that raised: "unavailable" when the implementation cannot run here (a
    backend not built, a peer not installed, an op module not written), else "error"."""
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if isinstance(exc, (Unavailable, ImportError)) or (isinstance(exc, RuntimeError) and _originates_in_backends(exc)):
        return "unavailable", str(exc).splitlines()[0][:300] if isinstance(exc, Unavailable) else msg
    return "error", msg


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _cast(inputs: dict, dtype) -> dict:
    return {k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


@dataclass
class OpCase:
    """One op at one shape, dtype and mode ("fwd": outputs; "bwd": gradients of every differentiable input,
    timed as the backward pass alone from a retained graph; "fwd_bwd": the same gradients, timed as forward and
    backward together, for ops whose forward does backward work, e.g. the fused linear + cross-entropy)."""
    op: str
    name: str
    shape: dict
    dtype: torch.dtype
    mode: str
    make_inputs: Callable[[torch.Generator, torch.device], dict]   # random inputs at the case's dtype
    reference: Callable                                            # fastlm.reference function, fn(**inputs)
    impls: list[Impl]
    flops: float | None = None
    bytes: float | None = None
    grad_inputs: tuple = ()
    check_case: "OpCase | None" = None     # a smaller case the error is checked on when the reference is too big
    # with a check_case, also a part of the timed shape's result: spot_check(outputs, inputs) -> (got, ref64, ref_low)
    spot_check: "Callable | None" = None
    skip_reason: str = ""                  # set when fastlm's op module is missing: one "unavailable" row
    _refs: tuple | None = field(default=None, init=False, repr=False)

    @property
    def bound(self):
        return "compute" if self.flops else "memory"

    def base_result(self, impl: Impl) -> Result:
        return Result(op=self.op, case=self.name, shape=self.shape, dtype=str(self.dtype).replace("torch.", ""),
                      mode=self.mode, impl=impl.name, kind=impl.kind, backend=impl.backend, flops=self.flops,
                      bytes=self.bytes, bound=self.bound)

    # -- inputs ------------------------------------------------------------------------------------------------

    def input_sets(self, device, n: int) -> list[dict]:
        return [self.make_inputs(torch.Generator(device=device).manual_seed(1000 + i), device) for i in range(n)]

    def n_sets(self, device) -> int:
        """Input sets of about 96 MB in all on a CPU, up to 8 (2 for a backward), more than most CPUs' last-level
        cache (a GPU flushes L2 instead)."""
        if device.type == "cuda":
            return 1
        one = self.make_inputs(torch.Generator(device=device).manual_seed(0), device)
        nbytes = sum(t.numel() * t.element_size() for t in one.values() if isinstance(t, torch.Tensor))
        # each backward set keeps its forward graph alive (the eager reference's scores included), on a CPU for
        # every implementation of the case at once (they are timed in rotation): at most two
        return max(1, min(2 if self.mode == "bwd" else 8, math.ceil(96 * 2**20 / max(nbytes, 1))))

    # -- running -------------------------------------------------------------------------------------------------

    def forward(self, fn, inputs):
        """Outputs of fn in "fwd" mode; gradients of the differentiable inputs in the other modes."""
        if self.mode == "fwd":
            with torch.no_grad():
                return _as_tuple(fn(**inputs))
        leaves = {k: (v.detach().requires_grad_(True) if k in self.grad_inputs else v) for k, v in inputs.items()}
        outs = [o for o in _as_tuple(fn(**leaves)) if o.requires_grad]
        gen = torch.Generator(device=outs[0].device).manual_seed(7)
        douts = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, douts)
        return tuple(leaves[k].grad for k in self.grad_inputs)

    def closure(self, fn, inputs):
        """The timed call on one input set."""
        if self.mode == "fwd":
            def call():
                with torch.no_grad():
                    fn(**inputs)
            return call
        leaves = {k: (v.detach().requires_grad_(True) if k in self.grad_inputs else v) for k, v in inputs.items()}
        outs = [o for o in _as_tuple(fn(**leaves)) if o.requires_grad]
        douts = [torch.randn_like(o) for o in outs]
        grads = [leaves[k] for k in self.grad_inputs]
        if self.mode == "fwd_bwd":
            del outs                                     # each call builds (and frees) its own graph

            def call():
                for g in grads:
                    g.grad = None
                new = [o for o in _as_tuple(fn(**leaves)) if o.requires_grad]
                torch.autograd.backward(new, douts)
            return call

        def call():
            for g in grads:
                g.grad = None
            torch.autograd.backward(outs, douts, retain_graph=True)
        return call

    def check(self, impl: Impl, device) -> tuple[float, float, bool, str]:
        """(max error vs the float64 reference, PyTorch's own error at this dtype, rule passed, what was compared)."""
        case = self.check_case or self
        if case is not self and impl.compiled:
            return None, None, None, f"not checked (compiling it again at {case.name} would cost more than the run)"
        if case._refs is None:              # the references do not depend on the implementation: computed once
            inputs = case.input_sets(device, 1)[0]
            case._refs = (inputs, case.forward(case.reference, _cast(inputs, torch.float64)),
                          case.forward(case.reference, inputs))
        inputs, ref64, ref_low = case._refs
        out = case.forward(impl.fn, impl.converted(inputs, case.mode))
        names = case.grad_inputs if case.mode != "fwd" else [f"out{i}" for i in range(len(ref64))]
        if len(out) != len(ref64):
            return float("nan"), float("nan"), False, f"{len(out)} outputs, reference has {len(ref64)}"
        compared = list(zip(names, out, ref64, ref_low))
        what = ("grads " + ",".join(names)) if case.mode != "fwd" else "output"
        if case is not self:
            what += f" at {case.name}"
            if self.spot_check is not None:      # the timed shape itself, in part
                inputs = self.input_sets(device, 1)[0]
                got = self.forward(impl.fn, impl.converted(inputs, self.mode))
                compared.append(("spot check", *self.spot_check(got, inputs)))
                what += " and a part of the output at the timed shape"
        verdicts = [testing.passes_rule(*c) for c in compared]
        return (max((v[1] for v in verdicts), default=0.0), max((v[2] for v in verdicts), default=0.0),
                all(v[0] for v in verdicts), what)

    def prepare(self, impl: Impl, ctx: Context, sets: list[dict] | None = None):
        """Check ``impl`` against the reference, then return (result so far, timed closures, one per input set)."""
        res = self.base_result(impl)
        res.max_err, res.ref_err, res.correct, res.check = self.check(impl, ctx.device)
        res.status = "wrong" if res.correct is False else "ok"
        sets = sets if sets is not None else self.input_sets(ctx.device, self.n_sets(ctx.device))
        return res, [self.closure(impl.fn, impl.converted(s, self.mode)) for s in sets]

    def run(self, ctx: Context, progress=None) -> list[Result]:
        if self.skip_reason:
            res = self.base_result(Impl("fastlm", "fastlm", None))
            res.status, res.message = "unavailable", self.skip_reason
            if progress is not None:
                progress.update(len(self.impls) or 1)
            return [res]
        sets = self.input_sets(ctx.device, self.n_sets(ctx.device))
        results = run_impls(self, ctx, progress, sets=sets)
        del sets
        self._refs = None
        if self.check_case is not None:
            self.check_case._refs = None
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        return results

    def finalize(self, res: Result, ctx: Context):
        """Called after timing (a whole-model case reads its peak memory here)."""


def prepared(case, impl: Impl, ctx: Context, **prepare_kw) -> tuple[Result, list[Callable] | None]:
    """Check one implementation of a case: (its result so far, its timed closures), or (its result with the failure
    as status, None). An unavailable default backend is replaced by its fallback."""
    try:
        return case.prepare(impl, ctx, **prepare_kw)
    except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
        res = case.base_result(impl)
        res.status, res.message = failure(e)
        if res.status == "unavailable" and impl.fallback is not None:
            res, calls = prepared(case, impl.fallback, ctx, **prepare_kw)
            res.message = f"{impl.name} unavailable: {e}".splitlines()[0][:300]
            return res, calls
        return res, None


def _finish(case, res: Result, stats, ctx: Context, ceiling_in_rotation: float | None = None) -> None:
    try:
        if isinstance(stats, Exception):
            raise stats
        case.finalize(res, ctx)
        res.finish(stats, ctx.ceilings, ceiling_in_rotation)   # last: a row that failed carries no time
    except Exception as e:  # noqa: BLE001
        res.status, res.message = failure(e)


def rotation_ceiling(results: list[Result], ctx: Context,
                     n_sets: int | None = None) -> tuple[list[Callable], float, str] | None:
    """CPU: the kernel that defines the ceiling of a case's rows as closures to time in the case's rotation, the
    work of one call (bytes or FLOP) and its name: for memory-bound rows a read of their bytes from ``n_sets`` sets
    (CeilingKernels.read; an op case, whose calls cycle through that many input sets), or the copy (a model case,
    ``n_sets`` None); for compute-bound ones the GEMM their dtype's compute ceiling comes from. None without ceiling
    kernels (GPU) or rows."""
    kernels = ctx.ceiling_kernels
    if kernels is None or not results or ctx.ceilings is None:
        return None
    if results[0].bound == "memory":
        if n_sets and results[0].bytes:
            return (kernels.read(results[0].bytes, n_sets), float(results[0].bytes),
                    f"read of the case's bytes from {n_sets} set{'s' if n_sets > 1 else ''}")
        return kernels.copy(), float(kernels.copy_bytes), f"copy {kernels.copy_bytes / 2 / 2**20:.0f} MiB"
    gemm_dtype = ctx.ceilings["compute_gemm_dtype"].get(results[0].dtype)
    if gemm_dtype is None:
        return None
    return (kernels.gemm(getattr(torch, gemm_dtype)), float(gemm_flops(kernels.n, kernels.n, kernels.n)),
            f"matmul {_short(gemm_dtype)} {kernels.n}^3")


def run_impls(case, ctx: Context, progress=None, **prepare_kw) -> list[Result]:
    """Check and time every implementation of a case. On a GPU one after the other (a training step's peak memory
    is read right after its own timing); on a CPU checked one after the other, then timed in rotation. A case may
    set its own minimum of timed calls in place of the suite's (``min_reps``; not in the --tiny self-check)."""
    def note(impl):
        if progress is not None:
            progress.set_postfix_str(f"{case.op} {case.name} {impl.name}"[:60])

    timing = ctx.timing
    if getattr(case, "min_reps", None) is not None and timing is not TINY:
        timing = dataclasses.replace(timing, min_reps=case.min_reps)
    if ctx.device.type == "cuda":
        results = []
        for impl in case.impls:
            note(impl)
            res, calls = prepared(case, impl, ctx, **prepare_kw)
            if calls is not None:
                try:
                    stats = time_fns(calls, ctx.device, timing)
                except Exception as e:  # noqa: BLE001
                    stats = e
                _finish(case, res, stats, ctx)
            results.append(res)
            if progress is not None:
                progress.update(1)
        return results
    entries = []
    for impl in case.impls:
        note(impl)
        entries.append(prepared(case, impl, ctx, **prepare_kw))
    timed = [(res, calls) for res, calls in entries if calls is not None]
    n_sets = len(timed[0][1]) if timed and isinstance(case, OpCase) else None
    ceiling = rotation_ceiling([res for res, _ in timed], ctx, n_sets)
    all_stats = time_rotation([calls for _, calls in timed], timing, companion=ceiling[0] if ceiling else None)
    in_rotation = None
    if ceiling and isinstance(all_stats[-1], dict):
        in_rotation = ceiling[1] / all_stats[-1]["median_s"]
    for (res, _), stats in zip(timed, all_stats):
        if in_rotation:
            res.ceiling_kernel = ceiling[2]
        _finish(case, res, stats, ctx, in_rotation)
    if progress is not None:
        progress.update(len(entries))
    return [res for res, _ in entries]


def add_speedups(results: list[Result]):
    """For each fastlm row that is not wrong: median time of each timed peer in the same case that is not wrong / the
    fastlm time (a wrong answer gets no speed-up, nor is one measured against it)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.op, r.case, r.dtype, r.mode), []).append(r)
    for rows in groups.values():
        peers = [r for r in rows if r.kind == "peer" and r.median_s and r.correct is not False]
        for r in rows:
            if r.kind == "fastlm" and r.median_s and r.correct is not False:
                r.speedup = {p.impl: p.median_s / r.median_s for p in peers}


# ----------------------------------------------------------------------------------------------------------------------
# Environment, JSON, table, plots
# ----------------------------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ISA_FLAGS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
              ("amx_bf16", "AMX-BF16"))
KERNEL_ISA = ("AVX2", "FMA", "AVX-512", "AVX512-BF16", "AMX-BF16")  # those the C++ kernels can be compiled for


def isa_left_out(env: dict) -> list[str]:
    """The vector extensions of a bench JSON's host that its C++ kernels were not compiled for."""
    built = env.get("kernels_isa")
    if built is None:
        return []
    return [name for name in env.get("cpu_isa") or () if name in KERNEL_ISA and name not in built]


def cpu_isa() -> list[str]:
    """The host CPU's vector extensions that decide the C++ kernels' speed, with those compiled in (kernels_isa()):
    AVX2, FMA, AVX-512, AVX512-BF16 (bf16 dot products), AMX-BF16, as /proc/cpuinfo lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for flag, name in _ISA_FLAGS if flag in flags]


def kernels_isa() -> list[str] | None:
    """The vector extensions fastlm's C++ CPU kernels were compiled for (setup.py's FASTLM_MARCH), in cpu_isa()'s
    names; None when the extension is not built. They use what both lists have in common."""
    from fastlm.backends import extension
    ext = extension()
    return None if ext is None else list(ext.cpu_isa)


def cpu_bf16_engine() -> str | None:
    """Where the C++ CPU kernels' bf16 matrix products run (csrc/cpu/gemm.h's bf16_on_aten, FASTLM_CPU_BF16): "aten"
    (oneDNN, on the AMX-BF16 tiles where the CPU has them) or "fastlm" (its own kernels); None without the
    extension."""
    from fastlm.backends import extension
    ext = extension()
    return None if ext is None else ("aten" if ext.bf16_on_aten() else "fastlm")


def cpu_amx() -> bool | None:
    """Whether fastlm's own AMX-BF16 kernels ran (the bf16 attention forward; csrc/cpu/amx.h, FASTLM_CPU_AMX); None
    without the extension."""
    from fastlm.backends import extension
    ext = extension()
    return None if ext is None else bool(ext.amx_enabled())


def bf16_note(env: dict) -> str:
    """The remark a bench JSON's CPU figures carry where bf16 ran on ATen's kernels or on fastlm's AMX kernel."""
    parts = (["bf16 GEMMs on ATen's kernels (oneDNN)"] if env.get("cpu_bf16") == "aten" else []) + (
        ["bf16 attention on fastlm's AMX-BF16 kernel"] if env.get("cpu_amx") else [])
    return "".join("; " + p for p in parts)


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib import metadata
        return metadata.version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    import fastlm
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_isa": cpu_isa(),
        "kernels_isa": kernels_isa(),
        "cpu_bf16": cpu_bf16_engine(),
        "cpu_amx": cpu_amx(),
        "gpu_model": torch.cuda.get_device_name(device) if cuda else None,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "fastlm": fastlm.__version__,
        "fastlm_commit": _git_commit(),
        "extension": _extension_state(),
    }


def _extension_state() -> str:
    from fastlm import backends
    ext = backends.extension()
    if ext is None:
        return "not built"
    return "cpu+cuda" if getattr(ext, "with_cuda", False) else "cpu"


def to_json(results: list[Result], env: dict, ceilings: dict | None, config: dict, plots: list[str]) -> dict:
    return {"schema": SCHEMA, "env": env, "config": config, "ceilings": ceilings,
            "results": [dataclasses.asdict(r) for r in results], "plots": plots}


def fmt_rate(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def rate_text(r: dict) -> str:
    if r.get("tokens_per_s"):
        return fmt_rate(r["tokens_per_s"], "tok/s")
    if r.get("bound") == "memory" or (not r.get("flop_per_s") and r.get("bytes_per_s")):
        return fmt_rate(r.get("bytes_per_s"), "B/s")
    return fmt_rate(r.get("flop_per_s"), "FLOP/s")


def err_text(r: dict) -> str:
    if r.get("max_err") is None:
        return "-"
    if r.get("op") == "model" and r.get("mode") == "decode" and r.get("ref_err") is None:  # greedy tokens compared
        text = r["check"].rsplit(": ", 1)[-1].replace(" differ", " tok differ")
        return text + " WRONG" if r.get("correct") is False else text
    text = f"{r['max_err']:.2e}"
    return text + " WRONG" if r.get("correct") is False else text


def table(results: list[dict], *, show_unavailable: bool = False) -> str:
    """The printed table: one row per measured implementation; failed ones say why."""
    head = ["op", "case", "dtype", "mode", "impl", "median", "rate", "% ceil", "speed-up vs peers", "max err"]
    rows = []
    for r in results:
        if r["status"] == "unavailable" and r["kind"] != "fastlm" and not show_unavailable:
            continue
        if r["status"] in ("error", "unavailable", "skipped"):
            rows.append([r["op"], r["case"], _short(r["dtype"]), r["mode"], r["impl"], r["status"].upper(),
                         _Tail(r["message"][:100])])
            continue
        wrong = r.get("correct") is False     # its time is shown, never as a rate or a speed-up
        pct = "-" if r.get("pct_ceiling") is None or wrong else f"{r['pct_ceiling']:.0f}%"
        speed = " ".join(f"{k} {v:.2f}x" for k, v in r.get("speedup", {}).items()) or "-"
        rows.append([r["op"], r["case"], _short(r["dtype"]), r["mode"], r["impl"], fmt_time(r["median_s"]),
                     "-" if wrong else rate_text(r), pct, speed, err_text(r)])
    full = [r for r in rows if len(r) == len(head)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *full)]

    def line(cells):
        tail = cells[-1] if isinstance(cells[-1], _Tail) else None
        fixed = cells[:-1] if tail is not None else cells
        text = "  ".join(str(c).ljust(w) for c, w in zip(fixed, widths))
        return (text + ("  " + tail if tail is not None else "")).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for row in rows:
        key = (row[0], row[1], row[2], row[3])
        if prev is not None and key[0] != prev[0]:
            out.append("")
        out.append(line(row))
        prev = key
    return "\n".join(out)


class _Tail(str):
    """A message printed after the fixed columns of a row, not counted in their widths."""


def _short(dtype: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)


def summary_rows(results: list[dict]) -> list[dict]:
    """Per case and fastlm implementation: its rate, the fastest correct peer, the ratio and the error."""
    rows = []
    groups: dict = {}
    for r in results:
        groups.setdefault((r["op"], r["case"], r["dtype"], r["mode"]), []).append(r)
    for (op, case, dtype, mode), rs in groups.items():
        peers = [p for p in rs if p["kind"] == "peer" and p.get("median_s") and p.get("correct") is not False]
        best = min(peers, key=lambda p: p["median_s"]) if peers else None
        for r in rs:
            if r["kind"] != "fastlm":
                continue
            timed = r.get("median_s") is not None and r.get("correct") is not False  # no speed for a wrong answer
            rows.append({"op": op, "case": f"{case} {_short(dtype)} {mode}", "impl": r["impl"],
                         "rate": rate_text(r) if timed else r["status"],
                         "best_peer": best["impl"] if best else "-",
                         "ratio": (best["median_s"] / r["median_s"]) if (best and timed) else None,
                         "pct_ceiling": r.get("pct_ceiling") if timed else None, "ceiling": r.get("ceiling"),
                         "bound": r.get("bound"), "max_err": err_text(r)})
    return rows


def summary_table(results: list[dict]) -> str:
    rows = summary_rows(results)
    head = ["op", "case", "fastlm", "rate", "best peer", "ratio", "max err"]
    cells = [[r["op"], r["case"], r["impl"], r["rate"], r["best_peer"],
              "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["max_err"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in [head, ["-" * w for w in widths]] + cells)


def plot(results: list[dict], out_dir: str, env: dict) -> list[str]:
    """PNG plots: attention rate vs seqlen per implementation; decode bandwidth vs context; model tokens/s (none
    without matplotlib)."""
    from fastlm._plots import pyplot
    plt = pyplot("the plots")
    if plt is None:
        return []

    device = f"{env['device_name']} ({env['device'].upper()}, {env['threads']} threads)" \
        if env["device"] == "cpu" else env["device_name"]
    paths = []
    timed = [r for r in results if r.get("median_s")]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(sorted({r["impl"] for r in timed}))}

    def sweep(op, xkey, rate_key, scale, ylabel, fname, panel_keys):
        rows = [r for r in timed if r["op"] == op and xkey in r["shape"]]
        panels: dict = {}
        for r in rows:
            key = tuple((k, r["shape"].get(k)) for k in panel_keys) + (("dtype", r["dtype"]), ("mode", r["mode"]))
            panels.setdefault(key, {}).setdefault(r["impl"], []).append((r["shape"][xkey], r[rate_key] / scale))
        panels = {k: v for k, v in panels.items() if any(len(pts) > 1 for pts in v.values())}
        if not panels:
            return
        n = len(panels)
        cols = min(n, 3)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.2 * cols, 3.8 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, (key, lines) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
            for impl, pts in sorted(lines.items()):
                pts.sort()
                style = "-o" if impl.startswith("fastlm") else "--s"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl, markersize=4, color=colors[impl])
            ax.set_xscale("log", base=2)
            ax.set_title(", ".join(f"{k}={v}" for k, v in key), fontsize=8)
            ax.set_xlabel(xkey)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"fastlm {op}: {device}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    gpu = env["device"] == "cuda"
    sweep("attention", "seqlen", "flop_per_s", 1e12 if gpu else 1e9, "TFLOP/s" if gpu else "GFLOP/s",
          "attention.png", ("headdim", "causal"))
    sweep("decode", "context", "bytes_per_s", 1e9, "GB/s", "decode.png", ("batch", "headdim"))

    model = [r for r in timed if r["op"] == "model" and r.get("tokens_per_s")]
    if model:
        cases = list(dict.fromkeys(f"{r['case']} {_short(r['dtype'])}" for r in model))
        impls = list(dict.fromkeys(r["impl"] for r in model))
        fig, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases), 3.8), squeeze=False)
        for ax, case in zip(axes.flat, cases):
            vals = {r["impl"]: r["tokens_per_s"] for r in model if f"{r['case']} {_short(r['dtype'])}" == case}
            names = [i for i in impls if i in vals]
            ax.bar(range(len(names)), [vals[i] for i in names],
                   color=["tab:blue" if i.startswith("fastlm") else "tab:gray" for i in names])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
            ax.set_title(case, fontsize=8)
            ax.set_ylabel("tokens/s")
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle(f"fastlm model: {device}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "model.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# The run and the command line
# ----------------------------------------------------------------------------------------------------------------------

def default_backends(device: torch.device) -> list[str]:
    """What fastlm is measured with: never the Triton interpreter."""
    if device.type == "cuda":
        return ["triton", "cuda"]
    return ["cpu"]                  # bench_suites falls back to "torch" for ops the extension does not serve


def run(cases, ctx: Context, *, progress: bool = True) -> list[Result]:
    total = sum(max(1, len(c.impls)) for c in cases)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    results: list[Result] = []
    try:
        for case in cases:
            results.extend(case.run(ctx, bar))
    except KeyboardInterrupt:          # e.g. `timeout --signal=INT`: keep and report what was measured so far
        ctx.interrupted = True
        print("\ninterrupted: reporting the measurements made so far", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    add_speedups(results)
    return results


def _parse_list(text: str | None, allowed, what: str) -> list[str] | None:
    if text is None:
        return None
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))   # (each once, in order)
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"--{what} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return items


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlm bench",
                                description="Benchmark fastlm's kernels and model against their peers on this device "
                                            "(CPU: the C++ backend; GPU: Triton and CUDA), checking every result "
                                            "against the float64 reference.")
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: a few minutes (the default); full: the whole sweep")
    p.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)} (default: all; the quick suite on a CPU: "
                                 f"{','.join(CPU_QUICK_OPS)})")
    p.add_argument("--backend", help="comma-separated fastlm backends to measure (default: cpu on a CPU, falling "
                                     "back to torch where the extension lacks an op; triton,cuda on a GPU)")
    p.add_argument("--dtype", help="comma-separated dtypes (float32,float16,bfloat16; default: per case)")
    p.add_argument("--out", default="bench-results",
                   help="output directory for the JSON and PNG files (default: bench-results)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's default); recorded in the JSON")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (slow to compile on CPU)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--summary-of", metavar="JSON", help="print the short summary table of an earlier run and exit")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tiny shapes: the harness's own test
    return p


def default_ops(device: torch.device, suite: str, tiny: bool = False) -> list[str]:
    """Everything, except in the quick suite on a CPU: there the ops that carry a model's prefill and decoding time
    (attention, decode, FFN) and the model, which keeps the run within about 3 minutes; norms, RoPE and
    cross-entropy are measured with ``--ops`` or ``--suite full``.
    ``--tiny`` (the harness's own check) always covers every suite."""
    if device.type == "cpu" and suite == "quick" and not tiny:
        return list(CPU_QUICK_OPS)
    return list(OPS)


def cli(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.summary_of:
        try:
            doc = load(args.summary_of)
        except (OSError, ValueError) as e:
            print(f"error: --summary-of: {e}", file=sys.stderr)
            return 2
        print(summary_table(doc["results"]))
        return 0
    from fastlm.train import check_out_dir, check_threads
    try:
        check_out_dir(args.out, "--out")
        os.makedirs(args.out, exist_ok=True)     # before measuring: a run is never lost for want of its directory
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fastlm import bench_suites

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    try:
        ops = _parse_list(args.ops, OPS, "ops") or default_ops(device, args.suite, tiny)
        choices = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        backends_ = _parse_list(args.backend, choices, "backend") if args.backend else None
        dtypes = [DTYPES[d] for d in _parse_list(args.dtype, tuple(DTYPES), "dtype")] if args.dtype else None
        check_threads(args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    timing = timing_for(args.suite, device, tiny)
    ctx = Context(device=device, timing=timing, compile=not args.no_compile, tiny=tiny, suite=args.suite)
    bench_suites.configure_compile()
    cases = bench_suites.cases(ops, ctx, backends=backends_, dtypes=dtypes)
    if not cases:
        print("error: no benchmark case matches the chosen --ops/--dtype", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    case_dtypes = sorted({c.dtype for c in cases}, key=str)
    print(f"fastlm bench: {args.suite} suite on {device.type} ({torch.get_num_threads()} threads), "
          f"{len(cases)} cases; measuring ceilings...", file=sys.stderr)
    kernels = CeilingKernels(device, tiny=tiny)
    ctx.ceilings = measure_ceilings(device, case_dtypes, timing, tiny=tiny, kernels=kernels)
    ctx.ceiling_kernels = kernels if device.type != "cuda" else None   # a GPU's 2 GiB of copy buffers go back now
    del kernels
    results = run(cases, ctx)
    env = environment(device)
    rows = [dataclasses.asdict(r) for r in results]
    plots = [] if args.no_plots else plot(rows, args.out, env)
    given = sys.argv[1:] if argv is None else list(argv)
    config = {"command": shlex.join(["python", "-m", "fastlm", "bench", *given]),
              "suite": args.suite, "ops": ops, "backends": backends_ or default_backends(device),
              "dtypes": [str(d).replace("torch.", "") for d in case_dtypes], "compile": ctx.compile, "tiny": tiny,
              "timing": dataclasses.asdict(timing), "wall_s": round(time.perf_counter() - t0, 1),
              "interrupted": ctx.interrupted}
    doc = to_json(results, env, ctx.ceilings, config, [os.path.basename(p) for p in plots])
    path = os.path.join(args.out, "bench.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(_header(env, ctx.ceilings))
    print(table(rows))
    print(f"\nwrote {path}" + (f" and {', '.join(os.path.basename(p) for p in plots)}" if plots else "")
          + f" ({config['wall_s']} s)")
    wrong = [r for r in rows if r["kind"] == "fastlm" and r["status"] in ("wrong", "error")]
    if ctx.interrupted:
        return 130
    if wrong:
        print(f"{len(wrong)} fastlm measurement(s) WRONG or failed: " +
              ", ".join(f"{r['op']} {r['case']} {r['impl']}" for r in wrong[:8]), file=sys.stderr)
        return 1
    return 0


def _header(env: dict, ceilings: dict) -> str:
    what = "CPU figures" if env["device"] == "cpu" else "GPU figures"
    mm = ", ".join(f"{_short(k)} {fmt_rate(v, 'FLOP/s')}" for k, v in ceilings["matmul_flop_per_s"].items())
    return (f"\n{what}: {env['device_name']}, {env['threads']} threads{bf16_note(env)}; torch {env['torch']}, "
            f"triton {env['triton']}, CUDA {env['cuda']}; fastlm {env['fastlm_commit']}; {env['date']}\n"
            f"ceilings measured now: matmul {mm}; copy {fmt_rate(ceilings['copy_bytes_per_s'], 'B/s')}"
            + ("; each % of ceiling is against its ceiling kernel timed again in the case's rotation (a memory-bound "
               "op's: a read of as many bytes from as many input sets)\n"
               if env["device"] == "cpu" else
               "; times are GPU times (CUDA events around each call, L2 flushed before it; implementations one after "
               "another), not host latency\n"))


def load(path: str) -> dict:
    """Read a bench JSON, checking its schema tag and its results list (FileNotFoundError, ValueError)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected the bench.json of an earlier `python -m fastlm "
                                f"bench` run)" if not os.path.isdir(path) else
                                f"{path} is a directory; expected the bench.json of an earlier run (e.g. "
                                f"{os.path.join(path, 'bench.json')})")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path}: not a fastlm bench JSON (schema {schema!r}, expected {SCHEMA!r})")
    results = doc.get("results")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ValueError(f"{path}: a fastlm bench JSON without a list of results")
    for i, r in enumerate(results):
        missing = [k for k in _RESULT_KEYS if k not in r]
        if missing:
            raise ValueError(f"{path}: result {i} lacks {', '.join(missing)} (a damaged or hand-edited file)")
    return doc


# what every result row of a bench JSON holds (and the summary and plots read)
_RESULT_KEYS = ("op", "case", "shape", "dtype", "mode", "impl", "kind", "status", "median_s")


def _module_available(name: str) -> str:
    """'' when fastlm.ops.<name> imports, else the reason it does not."""
    try:
        importlib.import_module(f"fastlm.ops.{name}")
    except ImportError as e:
        return f"fastlm.ops.{name} not available ({e})"
    return ""
