"""Which backends exist on this machine, and what ``backend="auto"`` means.

Backends:
  "torch"   fastlm.reference: plain PyTorch math, any device, the ground truth.
  "triton"  kernels/ (Triton): CUDA tensors, or CPU tensors through the interpreter (TRITON_INTERPRET=1).
  "cpu"     the C++ CPU kernels of the extension fastlm._C (CPU tensors). Where the CPU has AMX-BF16, the bf16
            attention forward runs on fastlm's AMX kernel (FASTLM_CPU_AMX=auto|off; fastlm._C.amx_enabled()) and
            the bf16 GEMMs of linear and the MLPs on ATen's oneDNN kernels; FASTLM_CPU_BF16=auto|aten|fastlm
            chooses (aten: the attention forward too, where ATen's masks match; fastlm._C.bf16_on_aten()).
  "cuda"    the CUDA C++ kernels of the extension fastlm._C (CUDA tensors).
  "auto"    CUDA tensors: "triton"; CPU tensors: "cpu" when the extension is built and serves the op, else "triton"
            under the interpreter, else "torch". Inputs of a dtype no kernel takes (float64) get "torch",
            and so do attention past the Triton kernels' head dims and norms past their row width where "auto"
            would be Triton (fastlm.ops._checks.fit_triton).

Everything here is lazy and cached: importing fastlm compiles nothing and touches no GPU.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton and C++ CPU kernels take
# the ops with a CUDA C++ kernel (csrc/bindings_cuda.cpp; fp16 / bf16 only: tensor cores)
CUDA_OPS = ("attention_fwd", "decode_attention", "mlp_gelu", "mlp_swiglu")
# the head dims csrc/cuda's attention and decode kernels are built for (compiled_head_dim in launchers.h; the
# launcher host test checks that the two agree)
CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the fastlm checkout "
              "(CUDA kernels need a CUDA build of torch and nvcc)")


def interpreter() -> bool:
    """True when Triton kernels run through the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension module fastlm._C, or None when it was not built."""
    try:
        return importlib.import_module("fastlm._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def extension_has(op: str, device: str) -> bool:
    """Whether the extension registers ``torch.ops.fastlm.<op>`` with a kernel for ``device`` ("cpu"/"cuda")."""
    if extension() is None:
        return False
    try:
        handle = getattr(torch.ops.fastlm, op)
    except (AttributeError, RuntimeError):
        return False
    key = "CPU" if device == "cpu" else "CUDA"
    return torch._C._dispatch_has_kernel_for_dispatch_key(handle.default.name(), key)


def available() -> dict[str, bool]:
    """Which concrete backends can run here (for tensors of some device)."""
    ext = extension()
    return {
        "torch": True,
        "triton": triton_available() and (torch.cuda.is_available() or interpreter()),
        "cpu": ext is not None,
        "cuda": ext is not None and torch.cuda.is_available() and torch.version.cuda is not None
        and bool(getattr(ext, "with_cuda", False)),
    }


@torch.compiler.assume_constant_result
def resolve(backend: str, device, op: str, *, native_ops=(), dtype=None, triton_kernel: bool = True) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device``.

    ``native_ops`` names the extension ops (``torch.ops.fastlm.*``) that the "cpu"/"cuda" backends need; an op with
    none has no C++ implementation and "auto" never picks the extension for it. ``dtype``, the op's input dtype, sends
    "auto" to the reference when no kernel takes it (float64: the reference is the only float64 implementation), and
    bf16 on CPU tensors away from the Triton interpreter, which computes it wrongly (to the reference for "auto"; a
    TypeError for "triton"), unless ``triton_kernel`` is False (the op's "triton" path runs no Triton kernel).
    Raises ValueError for an unknown name, RuntimeError for a backend that cannot run here and TypeError for bf16 on
    the interpreter.
    Under torch.compile the choice is made once, at trace time (it depends only on its arguments and the machine).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and dtype is not None and dtype not in KERNEL_DTYPES:
        return "torch"
    dev = device.type if isinstance(device, torch.device) else str(device)
    chosen = _resolve(backend, dev, op, tuple(native_ops), interpreter())
    if chosen == "triton" and dev != "cuda" and dtype == torch.bfloat16 and triton_kernel:
        # the Triton interpreter computes bf16 wrongly (tl.dot, fp32 -> bf16 casts, bf16 additions): refuse, and let
        # "auto" take the reference
        if backend == "auto":
            return "torch"
        raise TypeError(f"{op}: backend='triton' on {dev} tensors runs through the Triton interpreter, which computes "
                        f"bfloat16 wrongly; use float32 / float16, or backend='cpu' or 'torch' for bfloat16")
    return chosen


@functools.lru_cache(maxsize=None)
def _resolve(backend: str, dev: str, op: str, native_ops: tuple, interpreting: bool) -> str:
    """resolve() for a device type, cached: the answer depends only on its arguments, whether the Triton interpreter
    is on, and the machine (a model's decoding step asks a few hundred times). Errors are raised, not cached."""
    if backend == "auto":
        if dev == "cuda":
            return "triton" if triton_available() else "torch"
        if native_ops and all(extension_has(n, "cpu") for n in native_ops) and dev == "cpu":
            return "cpu"
        if triton_available() and interpreting:
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"backend='triton' for {op}: triton is not installed; choices here: {_here()}")
        if dev != "cuda" and not interpreting:
            raise RuntimeError(f"backend='triton' for {op} needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               f"triton is imported to run on CPU tensors (got {dev} tensors); choices here: {_here()}")
    if backend in ("cpu", "cuda"):
        if extension() is None:
            raise RuntimeError(f"backend={backend!r} for {op}: the C++ extension fastlm._C is not built; {BUILD_HINT}")
        if not native_ops:
            raise RuntimeError(f"backend={backend!r}: {op} has no C++ implementation; use 'triton' or 'torch'")
        if dev != backend:
            raise ValueError(f"backend={backend!r} for {op} needs {backend} tensors, got {dev} tensors")
        missing = [n for n in native_ops if not extension_has(n, dev)]
        never = [n for n in missing if dev == "cuda" and n not in CUDA_OPS]
        if never:
            raise RuntimeError(f"backend='cuda' for {op}: fastlm has no CUDA C++ kernel for {', '.join(never)} (its "
                               f"CUDA kernels: {', '.join(CUDA_OPS)}); use 'triton' or 'auto'")
        if missing:
            raise RuntimeError(f"backend={backend!r} for {op}: the extension has no {dev} kernel for "
                               f"{', '.join(missing)}; {BUILD_HINT}")
    return backend


def _here() -> str:
    return ", ".join(["auto"] + [k for k, ok in available().items() if ok])
