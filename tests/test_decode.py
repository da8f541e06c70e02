"""decode_attention: every backend against the float64 reference (numerics rule), ragged cache lengths, GQA, odd
head dims, several new tokens per step, explicit split counts, CUDA-graph / torch.compile friendliness, bad input."""
import pytest
import torch

from conftest import (CUDA_HEAD_DIMS, DEVICE, ON_GPU, backend_device, cuda_kernel_test, far_views, needs_cuda_kernel,
                      triton_and_cpu)
from fastlm import backends, reference
from fastlm.ops import decode_attention
from fastlm.testing import check_rule

_CUDA = needs_cuda_kernel("decode_attention")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# dtypes per backend: Triton at conftest.DTYPES (bf16 on a GPU only), the C++ CPU kernels at fp32/fp16/bf16, the CUDA
# kernels, tensor-core kernels, at fp16/bf16
_TRITON_CPU, _TRITON_CPU_DTYPES = triton_and_cpu("decode_attention")
BACKENDS = _TRITON_CPU + [pytest.param("cuda", marks=_CUDA)]
BACKEND_DTYPES = _TRITON_CPU_DTYPES + [pytest.param("cuda", d, marks=_CUDA) for d in (F16, BF16)]


def _dtype(backend):
    """The most precise dtype the backend serves (fp32, but fp16 for the tensor-core CUDA kernels)."""
    return F16 if backend == "cuda" else F32


def _inputs(B, Sq, H, Hkv, D, S_max, seqlens, dtype, device, scale=1.0):
    q = (torch.randn(B, Sq, H, D, dtype=torch.float64) * scale).to(dtype)
    k = torch.randn(B, S_max, Hkv, D, dtype=torch.float64).to(dtype)
    v = torch.randn(B, S_max, Hkv, D, dtype=torch.float64).to(dtype)
    lens = torch.tensor(seqlens, dtype=torch.int32)
    return q.to(device), k.to(device), v.to(device), lens.to(device)


def _check(out, q, k, v, lens, softmax_scale=None, name="out", window_left=-1):
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or NaN)"
    kw = dict(softmax_scale=softmax_scale, window_left=window_left)
    ref64 = reference.decode_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), lens.cpu(), **kw)
    ref_low = reference.decode_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), **kw)
    check_rule(name, out.cpu(), ref64, ref_low)


# (D, group, Sq): every head dim, GQA ratio and new-token count appears, without the full cross product
SHAPES = [(16, 1, 1), (40, 2, 2), (64, 4, 1), (80, 1, 4), (128, 2, 1), (64, 1, 2), (40, 4, 4), (128, 4, 4),
          (64, 8, 3),  # 24 rows per kv head, more than one 16-row tile
          # head dims with a tail past the last whole SIMD vector on AVX2 (8 floats) and AVX-512 (16) alike, and odd
          # rows per kv head (the C++ kernel's one-row dot products and P V updates after its four- and two-row ones)
          (20, 3, 1), (20, 7, 1), (36, 1, 3),
          # an odd number of whole vectors on AVX2 (7) and AVX-512 (3): the one-row dot product's last vector
          (56, 3, 1)]


def _matrix():
    """Every (backend, dtype) with every shape it serves: the CUDA kernels only have their compiled head dims."""
    out = []
    for pair in BACKEND_DTYPES:
        (backend, dtype), marks = (pair.values, pair.marks) if hasattr(pair, "marks") else (pair, ())
        for D, group, Sq in SHAPES:
            if backend != "cuda" or D in CUDA_HEAD_DIMS:
                out.append(pytest.param(backend, dtype, D, group, Sq, marks=marks,
                                        id=f"{backend}-{str(dtype)[6:]}-d{D}-g{group}-sq{Sq}"))
    return out


@pytest.mark.parametrize("backend,dtype,D,group,Sq", _matrix())
def test_numerics(backend, dtype, D, group, Sq):
    # ragged lengths: a single valid key (earlier new queries then see none), the full cache, one in between
    Hkv, S_max = 2, 75
    q, k, v, lens = _inputs(3, Sq, group * Hkv, Hkv, D, S_max, [1, S_max, 37], dtype, backend_device(backend))
    out = decode_attention(q, k, v, lens, backend=backend)
    _check(out, q, k, v, lens)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("window_left", [0, 1, 5, 37, 300])
def test_sliding_window(backend, dtype, window_left):
    # query p sees keys p - window_left .. p: windows inside one key block, across blocks, longer than the cache
    # (no window); several new queries, ragged lengths, GQA; long enough for several CPU chunks / Triton / CUDA splits.
    # Head dim 36: a vector tail on AVX2 and AVX-512 alike (the CUDA kernels take their compiled head dims only).
    D = 64 if backend == "cuda" else 36
    q, k, v, lens = _inputs(3, 3, 4, 2, D, 700, [700, 3, 333], dtype, backend_device(backend))
    out = decode_attention(q, k, v, lens, window_left=window_left, backend=backend)
    _check(out, q, k, v, lens, window_left=window_left)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_and_scale(backend):
    # q.k ~ 30: exercises the running-max rescaling across key blocks and across splits
    q, k, v, lens = _inputs(2, 2, 4, 2, 64, 140, [140, 90], _dtype(backend), backend_device(backend), scale=4.0)
    out = decode_attention(q, k, v, lens, softmax_scale=0.3, backend=backend)
    _check(out, q, k, v, lens, softmax_scale=0.3)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("softmax_scale", [-0.3, 0.0])
def test_negative_and_zero_scale(backend, dtype, softmax_scale):
    # a negative scale flips which keys dominate; zero gives every visible key the same weight
    q, k, v, lens = _inputs(2, 2, 4, 2, 64, 140, [140, 90], dtype, backend_device(backend), scale=2.0)
    out = decode_attention(q, k, v, lens, softmax_scale=softmax_scale, backend=backend)
    _check(out, q, k, v, lens, softmax_scale=softmax_scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_new_queries(backend):
    # a prefill-sized chunk (66 rows per kv head: several row blocks), one sequence shorter than the chunk
    q, k, v, lens = _inputs(2, 33, 4, 2, 32, 50, [50, 20], _dtype(backend), backend_device(backend))
    _check(decode_attention(q, k, v, lens, backend=backend), q, k, v, lens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_without_keys(backend):
    # cache shorter than the new-token count: queries at negative positions see nothing and must give exactly 0
    q, k, v, lens = _inputs(3, 4, 2, 1, 32, 10, [2, 0, 10], _dtype(backend), backend_device(backend))
    out = decode_attention(q, k, v, lens, backend=backend)
    assert (out[0, :2] == 0).all() and (out[1] == 0).all()
    _check(out, q, k, v, lens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_lengths_are_clamped(backend):
    # lengths are not checked on the host (no sync); every backend and the reference take them into [0, S_max]
    q, k, v, lens = _inputs(3, 2, 2, 1, 32, 10, [-3, 15, 7], _dtype(backend), backend_device(backend))
    out = decode_attention(q, k, v, lens, backend=backend)
    assert (out[0] == 0).all()
    full = decode_attention(q[1:2], k[1:2], v[1:2], torch.tensor([10], device=lens.device), backend=backend)
    assert torch.equal(out[1:2], full)  # (10 keys are one split for every backend: the same arithmetic)
    _check(out, q, k, v, lens)
    # int64 lengths past 2^31 are clamped, not wrapped to their low 32 bits (2^32 + 5 is not 5, 2^40 is not 0)
    wide = torch.tensor([2**32 + 5, 2**40, -2**40], dtype=torch.int64, device=lens.device)
    out = decode_attention(q, k, v, wide, backend=backend)
    assert torch.equal(out[:2], decode_attention(q[:2], k[:2], v[:2], torch.full_like(wide[:2], 10), backend=backend))
    assert (out[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_unseen_cache_rows_may_hold_anything(backend):
    # a cache allocated with torch.empty: rows past the lengths and before every query's window are never seen, and
    # NaN / inf there must not reach the output (0 x NaN in a P V product would)
    q, k, v, lens = _inputs(2, 2, 4, 2, 32, 40, [30, 11], _dtype(backend), backend_device(backend))
    grads = backend == "torch"                                          # (the one differentiable backend)
    q.requires_grad_(grads)
    clean = decode_attention(q, k, v, lens, window_left=6, backend=backend)
    dq = torch.autograd.grad(clean.sum(), q)[0] if grads else None
    k[0, 30:], v[0, 30:], k[1, 11:], v[1, 11:] = float("nan"), float("inf"), float("inf"), float("nan")
    k[0, :20], v[0, :20] = float("nan"), float("nan")                   # before the window of both queries
    out = decode_attention(q, k, v, lens, window_left=6, backend=backend)
    assert torch.equal(out, clean)
    if grads:                                                           # dQ = dS K: 0 x NaN there too
        assert torch.equal(torch.autograd.grad(out.sum(), q)[0], dq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache(backend):
    # max_seqlen 0 (a zero-size cache: on the GPU its data pointer is null): no query sees a key, out is 0
    q, k, v, lens = _inputs(2, 1, 2, 1, 32, 0, [0, 0], _dtype(backend), backend_device(backend))
    out = decode_attention(q, k, v, lens, backend=backend)
    assert out.shape == q.shape and (out == 0).all()
    # a zero-size cache with a strided head dim has no element to read: its strides are no error either
    k, v = (torch.cat([t, t], dim=-1)[..., ::2] for t in (k, v))
    out = decode_attention(q, k, v, lens, backend=backend)
    assert out.shape == q.shape and (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad(backend):
    """Forward only: with inputs that require grad the kernels give the same output, and a backward through them
    raises (instead of leaving None gradients); the torch backend differentiates."""
    q, k, v, lens = _inputs(1, 2, 4, 2, 32, 40, [33], _dtype(backend), backend_device(backend))
    expected = decode_attention(q, k, v, lens, backend=backend)
    q, k = q.requires_grad_(), k.requires_grad_()
    out = decode_attention(q, k, v, lens, backend=backend)
    assert out.requires_grad and torch.equal(out.detach(), expected)
    with pytest.raises(RuntimeError, match="decode_attention has no backward with the kernel backends"):
        out.float().sum().backward()
    decode_attention(q, k, v, lens, backend="torch").float().sum().backward()
    assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_lengths_and_strided_cache(backend):
    # a per-layer view of a (layers, B, S_max, Hkv, D) cache and a non-contiguous q, as a decode loop passes them
    device = backend_device(backend)
    D = 64 if backend == "cuda" else 40  # the CUDA kernels are compiled for head dims 32, 64, 96, 128, 256
    cache = torch.randn(2, 2, 2, 50, 2, D, device=device).to(_dtype(backend))  # (kv, layers, B, S, Hkv, D)
    k, v = cache[0, 1], cache[1, 1]
    q = torch.randn(2, 4, 1, D, device=device).to(_dtype(backend)).transpose(1, 2)  # (B, Sq=1, H=4, D), strided
    lens = torch.tensor([50, 17], dtype=torch.int64, device=device)
    out = decode_attention(q, k, v, lens, backend=backend)
    _check(out, q, k, v, lens)
    # v with strides of its own (a head-major (B, Hkv, S_max, D) cache seen through a transpose), k as before, and
    # the lengths read through a stride
    v = torch.randn(2, 2, 50, D, device=device).to(_dtype(backend)).transpose(1, 2)
    lens = torch.tensor([50, 0, 17, 0], dtype=torch.int64, device=device)[::2]
    out = decode_attention(q, k, v, lens, backend=backend)
    _check(out, q, k, v, lens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [0, 2], ids=["batch", "heads"])
def test_offsets_past_int32(backend, dim):
    """q and the caches with elements past 2^31 in their buffer: a batch stride of 2^29 (sequence 4 starts at 2^31),
    or a head stride of 2^29 (head-major (B, Hkv, S_max, D) caches seen through a transpose: kv head 4)."""
    B, H, Hkv = (5, 2, 1) if dim == 0 else (1, 5, 5)
    q, k, v = far_views([(B, 2, H, 32), (B, 40, Hkv, 32), (B, 40, Hkv, 32)], dim, 2**29, _dtype(backend),
                        backend_device(backend))
    lens = torch.tensor([40, 7, 33, 1, 40][:B], device=q.device)
    out = decode_attention(q, k, v, lens, backend=backend)
    _check(out, q, k, v, lens)


@pytest.mark.parametrize("num_splits", [1, 3, 9])
def test_triton_split_counts(num_splits):
    # 9 splits of a 5-block cache leaves some splits empty; the combine must ignore them
    from fastlm.kernels.decode import decode_attention_fwd
    q, k, v, lens = _inputs(2, 2, 4, 1, 64, 150, [150, 61], torch.float32, DEVICE)
    out = decode_attention_fwd(q, k, v, lens, None, num_splits=num_splits)
    _check(out, q, k, v, lens)


def test_matches_sdpa():
    # an independent check of the reference semantics: full cache, Sq = 1, no GQA
    q, k, v, lens = _inputs(2, 1, 4, 4, 64, 40, [40, 40], torch.float32, DEVICE)
    out = decode_attention(q, k, v, lens)  # backend="auto"
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert (out - sdpa.transpose(1, 2)).abs().max() < 1e-5


def test_empty_batch_and_float64_torch_backend():
    q, k, v, lens = _inputs(0, 1, 2, 1, 16, 8, [], torch.float32, DEVICE)
    assert decode_attention(q, k, v, lens, backend="triton").shape == (0, 1, 2, 16)
    # backend="torch" takes float64: each sequence's query against its valid cache prefix, by torch's SDPA in float64
    q, k, v, lens = _inputs(2, 1, 2, 1, 16, 8, [3, 8], torch.float64, DEVICE)
    out = decode_attention(q, k, v, lens, backend="torch")
    assert out.dtype == torch.float64
    for b, n in enumerate(lens.tolist()):
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].transpose(1, 2), k[b:b + 1, :n].transpose(1, 2), v[b:b + 1, :n].transpose(1, 2),
            enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out[b:b + 1], sdpa, atol=1e-12, rtol=1e-12)


def test_opcheck():
    from fastlm.ops.decode import _decode_attention_triton
    for window_left in (-1, 2):
        torch.library.opcheck(_decode_attention_triton,
                              _inputs(1, 1, 2, 1, 16, 8, [5], torch.float32, DEVICE) + (0.25, window_left))


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_compile_fullgraph_no_host_sync(backend):
    q, k, v, lens = _inputs(2, 1, 4, 2, 32, 40, [40, 9], _dtype(backend), backend_device(backend))
    fn = torch.compile(lambda *a: decode_attention(*a, backend=backend), fullgraph=True)
    _check(fn(q, k, v, lens), q, k, v, lens)
    lens[1] = 30  # the same compiled graph serves new lengths: they are read on the device
    _check(fn(q, k, v, lens), q, k, v, lens)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=_CUDA)])
def test_cuda_graph_replay(backend):
    q, k, v, lens = _inputs(2, 1, 8, 2, 128, 4096, [4096, 1000], torch.bfloat16, "cuda")
    decode_attention(q, k, v, lens, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lens, backend=backend)
    lens.copy_(torch.tensor([123, 4000], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, q, k, v, lens)


@cuda_kernel_test("decode_attention")
def test_cuda_backend_rejects_fp32():
    q, k, v, lens = _inputs(1, 1, 2, 1, 64, 8, [3], torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        decode_attention(q, k, v, lens, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("D,group", [(128, 4), (64, 8), (128, 1)])
def test_long_cache_gpu(backend, D, group):
    q, k, v, lens = _inputs(2, 1, 2 * group, 2, D, 32768, [32768, 20001], torch.bfloat16, "cuda")
    _check(decode_attention(q, k, v, lens, backend=backend), q, k, v, lens)


@pytest.mark.parametrize("make,err,match", [
    (lambda q, k, v, l: (q[0], k, v, l), ValueError, "q must be 4-D"),
    (lambda q, k, v, l: (q, k[:, :, :, :8], v, l), ValueError, "same shape"),
    (lambda q, k, v, l: (q, k[:1], v[:1], l), ValueError, "batch"),
    (lambda q, k, v, l: (q, k[..., :8], v[..., :8], l), ValueError, "headdim of k_cache/v_cache"),
    (lambda q, k, v, l: (q[:, :, :3], k, v, l), ValueError, "divisible by nheads of k_cache"),
    (lambda q, k, v, l: (q, k.half(), v.half(), l), TypeError, "k_cache dtype"),
    (lambda q, k, v, l: (q.to(torch.int32), k, v, l), TypeError, "q dtype"),
    (lambda q, k, v, l: (q, k, v, l.float()), TypeError, "int32 or int64"),
    (lambda q, k, v, l: (q, k, v, l[:1]), ValueError, r"shape \(batch,\)"),
    (lambda q, k, v, l: (q, k, v, l.tolist()), TypeError, "cache_seqlens must be a torch.Tensor"),
    (lambda q, k, v, l: (q, k, v, l.to("meta")), ValueError, "cache_seqlens must be on q's device"),
])
def test_bad_input(make, err, match):
    q, k, v, lens = _inputs(2, 1, 4, 2, 16, 8, [3, 8], torch.float32, DEVICE)
    with pytest.raises(err, match=match):
        decode_attention(*make(q, k, v, lens), backend="triton")


def test_bad_backend_and_head_dim():
    q, k, v, lens = _inputs(1, 1, 2, 1, 16, 8, [3], torch.float32, DEVICE)
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_attention(q, k, v, lens, backend="tpu")
    with pytest.raises(TypeError, match="softmax_scale must be a number"):
        decode_attention(q, k, v, lens, softmax_scale="0.1", backend="triton")
    for backend in ("torch", "triton") + (("cpu",) if backends.extension() is not None and not ON_GPU else ()):
        for bad in (float("nan"), float("inf"), -1e39):
            with pytest.raises(ValueError, match="softmax_scale must be finite"):
                decode_attention(q, k, v, lens, softmax_scale=bad, backend=backend)
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="window_left must be an int >= -1"):
            decode_attention(q, k, v, lens, window_left=bad, backend="torch")
    q, k, v, lens = _inputs(1, 1, 2, 1, 264, 8, [3], torch.float32, DEVICE)
    with pytest.raises(ValueError, match="backend='triton' takes headdim 1..256"):
        decode_attention(q, k, v, lens, backend="triton")
    # past 256 "auto" runs the reference, and the C++ CPU kernel runs as for any head dim
    ref64 = reference.decode_attention(q.double(), k.double(), v.double(), lens)
    ref_low = reference.decode_attention(q, k, v, lens)
    for backend in ("auto",) + (("cpu",) if backends.extension() is not None and not ON_GPU else ()):
        check_rule("out", decode_attention(q, k, v, lens, backend=backend), ref64, ref_low)
