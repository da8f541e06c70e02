"""Test set-up: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, before anything imports fastlm.
Environment knobs: FASTLM_TEST_DEVICE=cuda|cpu overrides the device.

On a GPU the autotuned Triton kernels run their default configuration for each shape (FASTLM_TRITON_AUTOTUNE=0,
unless set otherwise): timing every candidate of every shape the tests use would make a first run take many
minutes. Every candidate is tested one at a time instead (test_attention / test_ffn: test_every_*_config), and the
tests about autotuning turn it on (the ``autotuning`` fixture).
"""
import math
import os

os.environ.setdefault("FASTLM_TRITON_AUTOTUNE", "0")

if os.environ.get("FASTLM_TEST_DEVICE", "") != "cuda":
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except ImportError:
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = os.environ.get("FASTLM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE == "cuda"
# The Triton interpreter gets bf16 wrong: tl.dot on bf16 operands, fp32 -> bf16 casts (it truncates instead of
# rounding to nearest) and bf16 additions all give wrong results. bf16 Triton kernels are tested on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
from fastlm.backends import CUDA_HEAD_DIMS  # noqa: E402,F401  (the head dims csrc/cuda's kernels are built for)


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh random inputs per case, but reproducible from the test id
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def autotuning(monkeypatch):
    """The Triton kernels autotune during the test (FASTLM_TRITON_AUTOTUNE=1)."""
    monkeypatch.setenv("FASTLM_TRITON_AUTOTUNE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-model tests: as fast as two, and immune to OpenMP spin-waits when other
    jobs load the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def needs_cpu_kernel(op):
    """A mark that skips a test (or a parameter) unless the C++ extension serves torch.ops.fastlm.<op> on the CPU."""
    from fastlm import backends
    return pytest.mark.skipif(not backends.extension_has(op, "cpu"),
                              reason=f"the C++ extension (fastlm._C) with the CPU {op} kernel is not built")


def needs_cuda_kernel(op):
    """The marks of a test (or parameter) of the C++ extension's CUDA kernel ``op``: a GPU test (skipped without a CUDA
    device); on a CUDA machine the extension must have been built with the kernel: a missing one fails the test,
    saying how to build it, instead of passing as a skip."""
    return [pytest.mark.gpu, pytest.mark.cuda_kernel(op)]


def cuda_kernel_test(op):
    """needs_cuda_kernel(op) as a test decorator."""
    def mark(fn):
        for m in needs_cuda_kernel(op):
            fn = m(fn)
        return fn
    return mark


def pytest_runtest_setup(item):
    from fastlm import backends
    for mark in item.iter_markers("cuda_kernel"):
        if ON_GPU and not backends.extension_has(mark.args[0], "cuda"):
            pytest.fail(f"fastlm._C has no CUDA {mark.args[0]} kernel on this CUDA machine: {backends.BUILD_HINT}",
                        pytrace=False)


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op (OpenMP) thread count set to n inside the block, restored after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def triton_and_cpu(op):
    """(backends, (backend, dtype) pairs) for an op with a Triton kernel and a C++ CPU kernel ``op``: Triton at
    DTYPES, the C++ kernel in fp32, fp16 and bf16 everywhere (bf16 is only wrong in the Triton interpreter). The pairs
    are tuples, or pytest.param for the C++ kernel (skipped where it is not built)."""
    cpu = needs_cpu_kernel(op)
    return (["triton", pytest.param("cpu", marks=cpu)],
            [("triton", dt) for dt in DTYPES]
            + [pytest.param("cpu", dt, marks=cpu) for dt in (torch.float32, torch.float16, torch.bfloat16)])


def far_views(shapes, dim, stride, dtype, device):
    """Tensors of `shapes` (randn) whose dimension `dim` has a stride of `stride` elements (the others contiguous
    among themselves), side by side in one buffer that reaches past 2^31 elements: kernels whose index arithmetic
    wraps in int32 read and write the wrong memory for the far elements. On a CPU the buffer is virtual memory, mostly
    never touched."""
    views, start = [], 0
    for shape in shapes:
        rest = shape[:dim] + shape[dim + 1:]
        strides = [math.prod(rest[i + 1:]) for i in range(len(rest))]
        strides.insert(dim, stride)
        views.append((start, shape, strides))
        start += math.prod(rest)
    assert start <= stride, "the views must fit side by side within one stride"
    size = max(o + sum((n - 1) * st for n, st in zip(sh, sts)) + 1 for o, sh, sts in views)
    assert size > 2**31, "the views must reach past 2^31 elements"
    buffer = torch.empty(size, dtype=dtype, device=device)
    out = []
    for offset, shape, strides in views:
        t = buffer.as_strided(shape, strides, offset)
        t.copy_(torch.randn(shape, dtype=dtype, device=device))
        out.append(t)
    return out


def backend_device(backend):
    """Where a backend's test tensors live: the C++ CPU kernels take CPU tensors, the others DEVICE's."""
    return "cpu" if backend == "cpu" else DEVICE


def perturb_norms_and_biases(model):
    """Random init leaves norm weights at one and biases at zero, so a dropped bias or a swapped norm weight would
    not show: move them (fastlm's and transformers' parameter names alike)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
