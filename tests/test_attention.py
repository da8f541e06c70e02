"""fastlm.ops.attention against the float64 reference (numerics rule), for every backend that can run here.

Backends: "triton" (interpreter on CPU: fp32/fp16; on a GPU also bf16), "cpu" (C++ extension, CPU tensors:
fp32/fp16/bf16), "cuda" (C++ extension on a GPU: fp16/bf16). The same case matrix serves every backend; the C++ CPU
kernels also get head dims with a vector tail and long windowed sequences (CPU_CASES) under both of their backward
schedules.
"""
import math
import os

import numpy as np
import pytest
import torch

from conftest import (CUDA_HEAD_DIMS, DEVICE, ON_GPU, backend_device, far_views, needs_cpu_kernel, num_threads,
                      triton_and_cpu)
from fastlm import backends, ops, reference
from fastlm.testing import check_rule

# (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, causal, window)
CASES = [
    (1, 1, 1, 2, 2, 16, False, (-1, -1)),
    (2, 7, 7, 4, 2, 40, True, (-1, -1)),
    (1, 65, 65, 4, 1, 64, True, (-1, -1)),
    (1, 129, 129, 2, 2, 80, False, (-1, -1)),
    (1, 65, 129, 2, 1, 128, True, (-1, -1)),       # Sq < Sk: bottom-right causal
    (1, 129, 65, 2, 2, 64, True, (-1, -1)),        # Sq > Sk: the first 64 rows see no key
    (3, 7, 65, 3, 1, 40, False, (-1, -1)),         # GQA ratio 3, batch 3
    (1, 65, 65, 4, 2, 96, True, (8, -1)),          # causal sliding window
    (1, 129, 129, 2, 1, 64, False, (16, 4)),       # two-sided window, GQA 2
    (1, 33, 33, 2, 2, 72, False, (-1, 10)),
    (1, 7, 129, 4, 4, 80, True, (-1, -1)),         # few queries against a long context
    (1, 33, 47, 1, 1, 256, True, (-1, -1)),
    # windows wider than a tile (the interpreter's 32 x 32, the C++ CPU kernels' 64-key tiles): key tiles inside a
    # window are fully visible, and the kernels skip their masks
    (1, 200, 200, 2, 1, 64, True, (100, -1)),
    (1, 150, 230, 2, 2, 40, False, (70, 80)),
    # window_left = Sk - Sq + 1: the last query that sees a key tile is the first row of a query tile, for any tile
    # size (the backward's query range per key tile ends there)
    (1, 64, 64, 2, 1, 32, True, (1, -1)),
    (1, 40, 72, 2, 1, 32, True, (33, -1)),
]


def _ids(case):
    b, sq, sk, h, hkv, d, causal, win = case
    return f"b{b}-sq{sq}-sk{sk}-h{h}/{hkv}-d{d}-{'causal' if causal else 'full'}-w{win[0]},{win[1]}"


# Triton at conftest.DTYPES, the C++ CPU kernels at fp32/fp16/bf16 (CPU tensors), on a GPU the CUDA kernels too
BACKEND_DTYPES = triton_and_cpu("attention_fwd")[1] + (
    [("cuda", torch.float16), ("cuda", torch.bfloat16)] if ON_GPU else [])


def _params(backend_dtypes):
    """pytest params (backend, dtype) with readable ids; the CUDA kernels' and Triton's bf16 need a GPU."""
    out = []
    for pair in backend_dtypes:
        (backend, dtype), marks = (pair.values, list(pair.marks)) if hasattr(pair, "marks") else (pair, [])
        if backend == "cuda" or dtype == torch.bfloat16 and backend == "triton":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(backend, dtype, marks=marks, id=f"{backend}-{str(dtype)[6:]}"))
    return out


CPU_PARAMS = [p for p in _params(BACKEND_DTYPES) if p.values[0] == "cpu"]


def _require(backend):
    if backend in ("cpu", "cuda") and not backends.extension_has("attention_fwd", backend):
        pytest.fail(f"backend {backend!r}: the C++ extension with attention_fwd is not built "
                    f"({backends.BUILD_HINT})")


def _inputs(b, sq, sk, h, hkv, d, dtype, scale=1.0, device=DEVICE):
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype) * scale
    k = torch.randn(b, sk, hkv, d, device=device, dtype=dtype) * scale
    v = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    return q, k, v


def _references(q, k, v, do, dlse, **kw):
    """(out, lse, dq, dk, dv) of the reference in float64 and at the inputs' dtype."""
    results = []
    for dtype in (torch.float64, q.dtype):
        leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = reference.attention(*leaves, return_lse=True, **kw)
        loss = (out.to(torch.float64) * do.cpu().to(torch.float64)).sum()
        if dlse is not None:
            loss = loss + (torch.where(torch.isinf(lse), 0, lse).to(torch.float64) * dlse.cpu().double()).sum()
        grads = torch.autograd.grad(loss, leaves)
        results.append((out.detach(), lse.detach(), *grads))
    return results


# bf16 on the C++ CPU backend runs ATen's flash-attention kernel with FASTLM_CPU_BF16=aten, or by default where the
# CPU has AMX-BF16 but fastlm's AMX kernel is off (FASTLM_CPU_AMX): its exponentials are approximations, which put
# the LSE's sum within 2^-13 relative (up to 6.2e-5 measured; bf16 itself rounds to 2^-8), against ~1e-6 for exact
# fp32 math
CPU_BF16_LSE_ATOL = 2 ** -13


def _on_aten_flash(backend, q, k, causal=False, window=(-1, -1), softmax_scale=None, **_):
    """Whether ops.attention runs ATen's flash-attention kernel for these arguments (csrc/cpu/attention.cpp)."""
    ext = backends.extension()
    return (backend == "cpu" and q.dtype == torch.bfloat16 and ext is not None and ext.bf16_on_aten()
            and (os.environ.get("FASTLM_CPU_BF16") == "aten" or not ext.amx_enabled())
            and window[0] < 0 and (q.shape[1] == k.shape[1] if causal else window[1] < 0)
            and (softmax_scale is None or softmax_scale > 0))


def _check_case(backend, dtype, case, *, logit_scale=1.0, with_lse_grad=False):
    _require(backend)
    b, sq, sk, h, hkv, d, causal, window = case
    q, k, v = _inputs(b, sq, sk, h, hkv, d, dtype, scale=logit_scale, device=backend_device(backend))
    _check_attention(backend, q, k, v, torch.randn_like(q), with_lse_grad=with_lse_grad, causal=causal, window=window)


def _check_attention(backend, q, k, v, do, *, with_lse_grad=False, **kw):
    """Forward (out, LSE) and the gradients of q, k, v for the output gradient do (and a random LSE gradient)."""
    b, sq, h, _ = q.shape
    dtype = q.dtype
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.attention(q, k, v, return_lse=True, backend=backend, **kw)
    dlse = torch.randn_like(lse) if with_lse_grad else None
    ref64, ref_low = _references(q, k, v, do, dlse, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (b, h, sq)
    check_rule("out", out, ref64[0], ref_low[0])
    # the LSE is fp32 whatever the inputs' dtype: its low-precision reference is fp32 math on the same inputs
    lse_low = reference.attention(*(t.detach().cpu().float() for t in (q, k, v)), return_lse=True, **kw)[1]
    check_rule("lse", lse, ref64[1], lse_low, atol=CPU_BF16_LSE_ATOL if _on_aten_flash(backend, q, k, **kw) else None)
    outputs, grads = (out,), (do,)  # do itself reaches the backward (the views of test_offsets_past_int32)
    if dlse is not None:
        outputs, grads = (out, lse), (do, torch.where(torch.isinf(lse), 0, dlse))
    dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads)
    for name, g, g64, glow in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64[2:], ref_low[2:]):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        check_rule(name, g, g64, glow)


def _check_forward(backend, q, k, v, **kw):
    """out and lse of the forward alone against the float64 reference (the rule's peer: the reference in the inputs'
    dtype for out, in fp32 for lse)."""
    out, lse = ops.attention(q, k, v, return_lse=True, backend=backend, **kw)
    cpu = [t.cpu() for t in (q, k, v)]
    out64, lse64 = reference.attention(*(t.double() for t in cpu), return_lse=True, **kw)
    check_rule("out", out, out64, reference.attention(*cpu, **kw))
    check_rule("lse", lse, lse64, reference.attention(*(t.float() for t in cpu), return_lse=True, **kw)[1])


def _matrix():
    """Every (backend, dtype) with every case it serves: the CUDA kernel only has its compiled head dims."""
    out = []
    for param in _params(BACKEND_DTYPES):
        backend, dtype = param.values
        for case in CASES:
            if backend == "cuda" and case[5] not in CUDA_HEAD_DIMS:
                continue
            out.append(pytest.param(backend, dtype, case, marks=param.marks, id=f"{param.id}-{_ids(case)}"))
    return out


@pytest.mark.parametrize("backend,dtype,case", _matrix())
def test_attention_matches_reference(backend, dtype, case):
    _check_case(backend, dtype, case)


EVERY_BACKEND = ["triton", pytest.param("cpu", marks=needs_cpu_kernel("attention_fwd"))] + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if ON_GPU else [])


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("dim", [0, 1], ids=["batch", "seq"])
def test_offsets_past_int32(backend, dim):
    """q, k, v and the output gradient with elements past 2^31 in their buffer: a batch stride of 2^29 (batch 4 starts
    at 2^31, as in 8 x 128k tokens x 32 heads x 128), or a sequence stride of 2^26 (rows from 32 on, as a million-token
    sequence of 32 x 128 heads from row 2^19 on); forward and every gradient under the numerics rule."""
    _require(backend)
    b, s, h, hkv, d = (5, 24, 2, 1, 32) if dim == 0 else (1, 40, 2, 1, 32)
    q, k, v, do = far_views([(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)], dim,
                            2**29 if dim == 0 else 2**26, torch.float16, backend_device(backend))
    _check_attention(backend, q, k, v, do, causal=True)


@pytest.mark.parametrize("backend,dtype", _params(BACKEND_DTYPES))
def test_large_logits(backend, dtype):
    """q.k ~ 30: exercises the online-softmax rescaling when the running max jumps between key blocks."""
    _check_case(backend, dtype, (1, 65, 97, 2, 1, 64, True, (-1, -1)), logit_scale=math.sqrt(30 / math.sqrt(64)) * 2)


@pytest.mark.parametrize("backend,dtype", _params(BACKEND_DTYPES))
def test_rising_logits(backend, dtype):
    """Scores that rise along the keys, by about 6.4 (base 2) per 64 keys to 20: the running maximum grows every key
    tile, by less than the bf16 CPU kernels' rescale slack (8, csrc/cpu/bf16dot.h: they keep the old maximum, P
    then above 1) in some tiles and by more in others (they move it and rescale the output). The forward: out and
    LSE. (Keys with a common component this large put the C++ fp32 backward's dQ 2-5x past the rule: P recomputed
    from the fp32 LSE carries its rounding, ~1e-6 relative, into a sum that cancels; bench/dev/cpu_notes.md.)"""
    _require(backend)
    sk, device = 200, backend_device(backend)
    q, k, v = _inputs(1, 5, sk, 2, 1, 64, dtype, scale=0.05, device=device)
    q[..., 0], k[..., 0] = 1, torch.linspace(0, 20 * math.log(2), sk, device=device).to(dtype)[None, :, None]
    _check_forward(backend, q, k, v, softmax_scale=1.0)


@pytest.mark.parametrize("backend,dtype", _params(BACKEND_DTYPES))
def test_scores_jumping_past_the_exponent_range(backend, dtype):
    """Scores of ~0 in the first key tile and ~200 (~289 in base 2) from key 70 on: the running maximum must move in
    the second tile, since 2^289 overflows fp32 (the bf16 CPU kernels' one-pass softmax, csrc/cpu/bf16dot.h, keeps
    the maximum only where that is safe, and must fall back here). Then a NaN key in the third tile, which every query
    sees: every output and LSE NaN."""
    _require(backend)
    sk, device = 200, backend_device(backend)
    q, k, v = _inputs(1, 5, sk, 2, 1, 64, dtype, scale=0.05, device=device)
    q[..., 0], k[:, 70:, :, 0] = 1, 200
    _check_forward(backend, q, k, v, softmax_scale=1.0)
    k[:, 150, :, 1] = float("nan")
    out, lse = ops.attention(q, k, v, softmax_scale=1.0, return_lse=True, backend=backend)
    assert torch.isnan(out).all() and torch.isnan(lse).all()


@pytest.mark.parametrize("backend,dtype", _params([p for p in BACKEND_DTYPES
                                                   if (p.values if hasattr(p, "values") else p)[1] == torch.float16]))
def test_dot_products_past_the_fp16_range(backend, dtype):
    """fp16 q . k up to ~1.06e5, past fp16's largest value (65504), with softmax_scale 1/64: scaled scores of ~1650,
    tens apart. The kernels keep the product in fp32, and so does the reference at fp16 (backend="torch"), which
    rounds only the scaled scores to fp16 (it returned NaN). (Past fp16's range: bf16's spacing at such scores is as
    wide as their differences, which leaves its reference no precision to judge by.)"""
    _require(backend)
    q, k, v = _inputs(1, 37, 45, 2, 1, 64, torch.float32, device=backend_device(backend))
    q, k, v = (t.to(dtype) for t in (40 + 2 * q, 40 + 2 * k, v))
    assert torch.einsum("bqhd,bkd->bhqk", q.double(), k[:, :, 0].double()).max() > 65504
    _check_attention(backend, q, k, v, torch.randn_like(q), causal=True, softmax_scale=1 / 64)
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True, softmax_scale=1 / 64, backend="torch")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("backend,dtype",
                         _params([("triton", torch.float32)] + ([("triton", torch.bfloat16)] if ON_GPU else []))
                         + [p for p in CPU_PARAMS if p.values[1] == torch.float32])
def test_lse_gradient(backend, dtype):
    """A loss that uses lse as well as out (e.g. a downstream merge of partial attentions)."""
    _check_case(backend, dtype, (1, 40, 40, 2, 1, 32, True, (-1, -1)), with_lse_grad=True)


@pytest.mark.parametrize("backend,dtype", _params(BACKEND_DTYPES))
def test_rows_without_keys(backend, dtype):
    """Causal with Sq > Sk and a window that leaves rows empty: out 0, lse -inf, gradients 0, never NaN."""
    _require(backend)
    q, k, v = _inputs(1, 20, 9, 2, 1, 32, dtype, device=backend_device(backend))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.equal(out[:, :11].float().cpu(), torch.zeros(1, 11, 2, 32))
    assert torch.isneginf(lse[:, :, :11]).all() and torch.isfinite(lse[:, :, 11:]).all()
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.equal(q.grad[:, :11].float().cpu(), torch.zeros(1, 11, 2, 32))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # non-causal window (2, 3): query i sits at key position i - 11, so rows 0..7 see no key
    out2, lse2 = ops.attention(q.detach(), k.detach(), v.detach(), window=(2, 3), return_lse=True, backend=backend)
    assert torch.equal(out2[:, :8].float().cpu(), torch.zeros(1, 8, 2, 32)) and torch.isneginf(lse2[:, :, :8]).all()
    assert torch.isfinite(lse2[:, :, 8:]).all() and torch.isfinite(out2).all()


# The C++ CPU kernels widen K/V rows into fp32 tiles (csrc/cpu/attention.h, widen_rows): head dims 20 and 36 leave a
# tail past the last whole vector on AVX2 (8 floats) and AVX-512 (16) alike (the CASES head dims are whole vectors on
# AVX2). Several 64-key tiles, and windows under which the query blocks see different key ranges, the first of them
# past the kv head's first key.
CPU_CASES = [
    (2, 70, 70, 4, 2, 20, False, (-1, -1)),
    (1, 500, 500, 2, 1, 20, True, (150, -1)),      # causal window 150 over 8 key tiles, one kv head
    (1, 200, 330, 4, 2, 36, False, (40, 90)),      # two-sided window, Sq < Sk, GQA 2
    (1, 130, 200, 3, 1, 36, True, (-1, -1)),       # GQA 3, Sq < Sk, one kv head
]


@needs_cpu_kernel("attention_fwd")
@pytest.mark.parametrize("engine, amx", [("aten", "auto"), ("fastlm", "auto"), ("fastlm", "off")])
@pytest.mark.parametrize("case, scale, aten_serves", [
    ((2, 70, 70, 4, 2, 80, True, (-1, -1)), None, True),    # causal with Sq == Sk: top-left = bottom-right
    ((3, 7, 65, 3, 1, 40, False, (-1, -1)), 0.3, True),     # non-causal, GQA 3
    ((1, 65, 129, 2, 1, 64, True, (-1, -1)), None, False),  # causal with Sq < Sk: bottom-right, fastlm's kernel
    ((1, 65, 65, 4, 2, 96, True, (8, -1)), None, False),    # a window, fastlm's kernel
    ((1, 17, 17, 2, 1, 64, True, (-1, -1)), -0.5, False),   # causal with a negative scale (NaN in ATen's)
    ((1, 16, 16, 2, 2, 64, True, (-1, -1)), 0.0, False),
], ids=lambda x: _ids(x) if isinstance(x, tuple) else str(x))
def test_cpu_bf16_attention_on_either_engine(engine, amx, case, scale, aten_serves, monkeypatch):
    """bf16 attention forward on the C++ CPU backend runs fastlm's AMX-BF16 kernel where the CPU has AMX-BF16
    (FASTLM_CPU_AMX=auto), else its AVX512-BF16 / fp32 kernel; FASTLM_CPU_BF16=aten (or auto with FASTLM_CPU_AMX=off on
    such a CPU) takes ATen's flash-attention kernel where that kernel computes what fastlm's does. Every kernel by
    the numerics rule, forward and gradients, and the kernel expected (the profiler sees ATen's); the op's outputs
    have the layout its fake kernel promises (opcheck), and a direct call with inputs that require grad gets
    torch's not-implemented autograd node, not a graph of ATen's calls."""
    monkeypatch.setenv("FASTLM_CPU_BF16", engine)
    monkeypatch.setenv("FASTLM_CPU_AMX", amx)
    b, sq, sk, h, hkv, d, causal, window = case
    q, k, v = _inputs(b, sq, sk, h, hkv, d, torch.bfloat16, device="cpu")
    _check_attention("cpu", q.clone(), k.clone(), v.clone(), torch.randn_like(q), causal=causal, window=window,
                     softmax_scale=scale)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.attention(q, k, v, causal=causal, window=window, softmax_scale=scale, backend="cpu")
    names = {e.name for e in prof.events()}
    assert "fastlm::attention_fwd" in names
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in names) == (engine == "aten" and aten_serves), names
    args = (q, k, v, causal, d ** -0.5 if scale is None else scale, *(window if not causal else (window[0], 0)))
    torch.library.opcheck(torch.ops.fastlm.attention_fwd, args)
    out, lse = torch.ops.fastlm.attention_fwd(*(t.requires_grad_() if i < 3 else t for i, t in enumerate(args)))
    assert out.grad_fn.name().endswith("::WarnNotImplemented") and lse.is_contiguous()  # (not an ATen graph)
    monkeypatch.setenv("FASTLM_CPU_BF16", "amx")                 # an unknown value: an error on every bf16 call
    with pytest.raises(ValueError, match="FASTLM_CPU_BF16 must be auto, aten or fastlm, got 'amx'"):
        ops.attention(q.detach(), k.detach(), v.detach(), causal=causal, window=window, softmax_scale=scale,
                      backend="cpu")
    monkeypatch.setenv("FASTLM_CPU_BF16", engine)
    monkeypatch.setenv("FASTLM_CPU_AMX", "on")
    with pytest.raises(ValueError, match="FASTLM_CPU_AMX must be auto or off, got 'on'"):
        ops.attention(q.detach(), k.detach(), v.detach(), causal=causal, window=window, softmax_scale=scale,
                      backend="cpu")


@needs_cpu_kernel("attention_fwd")
def test_amx_kernels_run_where_built_and_the_cpu_has_them(monkeypatch):
    """fastlm._C.amx_enabled(): true exactly where the extension was built for AMX-BF16 (-march=native on such a
    CPU) and the CPU has it, so that on such a machine the tests above check the AMX kernel; FASTLM_CPU_AMX=off turns
    it off."""
    ext = backends.extension()
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    monkeypatch.delenv("FASTLM_CPU_AMX", raising=False)
    assert ext.amx_enabled() == ("AMX-BF16" in ext.cpu_isa and "amx_bf16" in flags)
    monkeypatch.setenv("FASTLM_CPU_AMX", "off")
    assert not ext.amx_enabled()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CPU_CASES, ids=_ids)
@pytest.mark.parametrize("backend,dtype", CPU_PARAMS)
def test_cpu_head_dim_tails_and_schedules(backend, dtype, case, threads):
    """The C++ kernels split their work by at::get_num_threads(), so the thread count is set here, the same on every
    machine. The forward hands out (batch, kv head, share of the query blocks) items, fewer shares with fewer threads:
    one thread walks many query blocks per item. The backward (csrc/cpu/attention_bwd.cpp) makes one pass (dQ with
    dK/dV per (batch, kv head)) when those items keep the threads busy, else two (dK/dV by key chunks, then dQ by query
    shares): one thread takes the single pass over several key tiles, two threads the split passes where there is one
    (batch, kv head)."""
    with num_threads(threads):
        _check_case(backend, dtype, case, with_lse_grad=True)


@pytest.mark.parametrize("backend,dtype,amx", [
    pytest.param(*p.values, amx, id=f"{p.id}-amx_{amx}") for p in CPU_PARAMS
    for amx in (("auto", "off") if p.values[1] == torch.bfloat16 else ("auto",))])
def test_cpu_keys_past_the_pack_budget(backend, dtype, amx, monkeypatch):
    """A kv head whose keys exceed a thread's share of the forward's pack budget (csrc/cpu/attention.h: 4M floats a
    thread on 2 threads, 16384 keys of head dim 128) is read unpacked, each key tile packed when a query block needs
    it: that path, on every kernel (bf16 with and without the AMX tiles: FASTLM_CPU_AMX), with a ragged last tile."""
    monkeypatch.setenv("FASTLM_CPU_AMX", amx)
    monkeypatch.setenv("FASTLM_CPU_BF16", "fastlm")
    with num_threads(2):
        _check_case(backend, dtype, (1, 5, 16411, 2, 1, 128, True, (-1, -1)))


def test_sdpa_cross_check():
    """Agreement with torch's scaled_dot_product_attention where its semantics coincide (Sq == Sk for causal)."""
    for causal, (sq, sk) in ((False, (33, 47)), (True, (65, 65))):
        q, k, v = _inputs(2, sq, sk, 4, 2, 64, torch.float32)
        out = ops.attention(q, k, v, causal=causal, backend="triton")
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=2e-5)


def test_non_contiguous_inputs():
    """Slices of a fused QKV projection and a (B, H, S, D) transpose: strided views, no copies needed by the caller."""
    b, s, h, d = 2, 37, 3, 40
    qkv = torch.randn(b, s, 3 * h, d + 8, device=DEVICE)[..., :d]          # last-dim slice too
    q, k, v = qkv[:, :, :h], qkv[:, :, h:2 * h], qkv[:, :, 2 * h:]
    assert not q.is_contiguous()
    out = ops.attention(q, k, v, causal=True, backend="triton")
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    ref32 = reference.attention(q, k, v, causal=True)
    check_rule("out", out, ref, ref32)
    qt = torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2)
    out_t = ops.attention(qt, k, v, backend="triton")
    check_rule("out", out_t, reference.attention(qt.double(), k.double(), v.double()), reference.attention(qt, k, v))


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("softmax_scale", [-0.3, 0.0])
def test_negative_and_zero_scale(backend, dtype, softmax_scale):
    """A negative scale flips which keys dominate, zero weighs every visible key alike: forward and gradients."""
    _require(backend)
    q, k, v = _inputs(2, 23, 41, 4, 2, 64, dtype, device=backend_device(backend))
    _check_attention(backend, q, k, v, torch.randn_like(q), with_lse_grad=True, causal=True,
                     softmax_scale=softmax_scale)


@pytest.mark.parametrize("backend", EVERY_BACKEND[:2])
def test_v_strides_differ_from_k(backend):
    """k contiguous and v a (B, Hkv, S, D) transpose: the kernels read v through its own strides, forward and
    backward (fp32: the Triton and C++ CPU kernels)."""
    b, sq, sk, h, hkv, d = 2, 19, 37, 4, 2, 40
    dev = backend_device(backend)
    q = torch.randn(b, sq, h, d, device=dev)
    k = torch.randn(b, sk, hkv, d, device=dev)
    vt = torch.randn(b, hkv, sk, d, device=dev)
    cot = torch.randn(b, sq, h, d, device=dev)
    grads = {}
    for name, dt in (("fast", None), ("ref", torch.float64), ("low", torch.float32)):
        leaves = [t.detach().to(dt or t.dtype).requires_grad_() for t in (q, k, vt)]
        args = leaves[0], leaves[1], leaves[2].transpose(1, 2)
        out = ops.attention(*args, causal=True, backend=backend) if name == "fast" else \
            reference.attention(*args, causal=True)
        (out * cot.to(out.dtype)).sum().backward()
        grads[name] = [out] + [t.grad for t in leaves]
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        check_rule(f"{what} ({backend}, v strided apart from k)", grads["fast"][i], grads["ref"][i], grads["low"][i])


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("loss", ["sum", "sum_over_seq"])
def test_expanded_output_gradient(backend, loss):
    """out.sum() hands backward a gradient of stride 0 in every dimension, out.sum(1) one of stride 0 along the
    sequence only (unit stride along the head dim): the kernels must read it through its strides."""
    reduce = (lambda o: o.sum()) if loss == "sum" else (lambda o: o.sum(1).square().sum())
    q, k, v = (t.requires_grad_() for t in _inputs(2, 33, 33, 2, 1, 32, torch.float32,
                                                   device=backend_device(backend)))
    reduce(ops.attention(q, k, v, causal=True, backend=backend)).backward()
    refs = []
    for dt in (torch.float64, torch.float32):  # the numerics rule: float64 truth, fp32 PyTorch's own error
        leaves = [t.detach().cpu().to(dt).requires_grad_() for t in (q, k, v)]
        reduce(reference.attention(*leaves, causal=True)).backward()
        refs.append([t.grad for t in leaves])
    for name, t, g64, g32 in zip(("dq", "dk", "dv"), (q, k, v), *refs):
        check_rule(f"{name} ({loss}, {backend})", t.grad.cpu(), g64, g32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5), (2, 5, 0)], ids=["batch0", "sq0", "sk0"])
def test_empty(shape, dtype):
    # ops.attention answers an empty batch, no query or no key itself, before any backend runs; lse's dtype is that
    # of a non-empty call's (float64 inputs: the reference's float64)
    b, sq, sk = shape
    q, k, v = _inputs(b, sq, sk, 2, 2, 16, dtype)
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
    full = ops.attention(*_inputs(1, 3, 3, 2, 2, 16, dtype), return_lse=True)[1]
    assert out.shape == q.shape and lse.shape == (b, 2, sq) and lse.dtype == full.dtype
    assert (out == 0).all() and torch.isneginf(lse).all()
    # differentiable inputs: the zeros are part of the graph, with zero gradients (as the reference's)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ops.attention(q, k, v, causal=True).sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape and not t.grad.any() for t in (q, k, v))


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 5, 6, 8, 9)], ids=_ids)
@pytest.mark.parametrize("with_lse_grad", [False, True])
def test_reference_backward_formulas_equal_autograd(case, with_lse_grad):
    """reference.attention_backward (explicit formulas, for code that cannot record a graph) equals autograd through
    reference.attention in float64: GQA, windows, rows without keys, an LSE gradient."""
    b, sq, sk, h, hkv, d, causal, window = case
    q, k, v = (t.double().requires_grad_() for t in _inputs(b, sq, sk, h, hkv, d, torch.float64, device="cpu"))
    out, lse = reference.attention(q, k, v, causal=causal, window=window, return_lse=True)
    do, dlse = torch.randn_like(out), torch.randn_like(lse) if with_lse_grad else None
    loss = (out * do).sum() + ((torch.where(torch.isinf(lse), 0, lse) * dlse).sum() if with_lse_grad else 0)
    want = torch.autograd.grad(loss, (q, k, v))
    got = reference.attention_backward(do, q.detach(), k.detach(), v.detach(), causal=causal, window=window,
                                       dlse=dlse)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("backend,dtype", _params(BACKEND_DTYPES))
def test_explicit_scale_gradients(backend, dtype):
    """softmax_scale reaches every gradient (the CUDA backend's backward is the Triton one)."""
    _require(backend)
    q, k, v = _inputs(2, 45, 45, 4, 2, 32, dtype, device=backend_device(backend))
    _check_attention(backend, q, k, v, torch.randn_like(q), with_lse_grad=True, causal=True, softmax_scale=0.3)


def test_default_scale_and_explicit_scale():
    q, k, v = _inputs(1, 17, 17, 2, 2, 48, torch.float32)
    a = ops.attention(q, k, v, backend="triton")
    b = ops.attention(q, k, v, softmax_scale=1 / math.sqrt(48), backend="triton")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = ops.attention(q, k, v, softmax_scale=0.3, backend="triton")
    check_rule("out", c, reference.attention(q.double(), k.double(), v.double(), softmax_scale=0.3),
               reference.attention(q, k, v, softmax_scale=0.3))


def test_torch_compile_and_opcheck():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 20, 20, 2, 1, 16, torch.float32))
    torch.library.opcheck(torch.ops.fastlm_triton.attention_fwd.default, (q, k, v, True, 0.25, -1, 0))

    def f(q, k, v):
        return ops.attention(q, k, v, causal=True, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = f(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash or garbage
# --------------------------------------------------------------------------------------------------------------------

def _good():
    return _inputs(2, 8, 8, 4, 2, 16, torch.float32)


BAD = [
    (lambda q, k, v: (q[0], k, v), {}, ValueError, "q must be 4-D"),
    (lambda q, k, v: (q, k[0], v), {}, ValueError, "k must be 4-D"),
    (lambda q, k, v: (q, k[:1], v[:1]), {}, ValueError, "batch of k/v"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), {}, ValueError, "headdim of k/v"),
    (lambda q, k, v: (q, k, v[:, :4]), {}, ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q[:, :, :3], k, v), {}, ValueError, "divisible"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), {}, TypeError, "dtype"),
    (lambda q, k, v: (q, k.half(), v), {}, TypeError, "same dtype"),
    (lambda q, k, v: (q.new_zeros(2, 8, 4, 300), k.new_zeros(2, 8, 2, 300), v.new_zeros(2, 8, 2, 300)),
     {"backend": "triton"}, ValueError, "backend='triton' takes headdim 1..256"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), {}, ValueError, "headdim must be >= 1"),
    (lambda q, k, v: (q, k, v), {"window": (-2, 0)}, ValueError, "window values must be >= -1"),
    (lambda q, k, v: (q, k, v), {"window": (3,)}, TypeError, "window must be a pair"),
    (lambda q, k, v: (q, k, v), {"window": (1.5, 2)}, TypeError, "window must be a pair"),
    (lambda q, k, v: (q, k, v), {"causal": True, "window": (4, 2)}, ValueError, "causal=True"),
    (lambda q, k, v: (q, k, v), {"causal": 1}, TypeError, "causal must be a bool"),
    (lambda q, k, v: (q, k, v), {"return_lse": 1}, TypeError, "return_lse must be a bool"),
    (lambda q, k, v: (q, k, v), {"softmax_scale": float("nan")}, ValueError, "softmax_scale must be finite"),
    (lambda q, k, v: (q, k, v), {"softmax_scale": 1e308}, ValueError, "softmax_scale must be finite in float32"),
    (lambda q, k, v: (q, k, v), {"causal": np.bool_(True)}, TypeError, r"causal must be a bool, got .*numpy"),
    (lambda q, k, v: (q, k, v), {"softmax_scale": "0.1"}, TypeError, "softmax_scale"),
    (lambda q, k, v: (q.cpu().numpy(), k, v), {}, TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k, v), {"backend": "tpu"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("make,kwargs,exc,match", BAD, ids=[m for *_, m in BAD])
def test_bad_input(make, kwargs, exc, match):
    args = make(*_good())
    with pytest.raises(exc, match=match):
        ops.attention(*args, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="checks the error for CUDA tensors asked of a CPU-only machine")
def test_mixed_devices_and_unavailable_backend():
    q, k, v = _good()
    with pytest.raises(ValueError, match="same device"):
        ops.attention(q, k.to("meta"), v.to("meta"))
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        ops.attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("backend", ["auto", pytest.param("cpu", marks=needs_cpu_kernel("attention_fwd"))])
def test_head_dim_past_triton_limit(backend):
    """Past the Triton kernels' 256, "auto" runs the reference and the C++ CPU kernels run as for any head dim."""
    _check_case(backend, torch.float32, (2, 9, 19, 4, 2, 300, True, (-1, -1)))


def test_auto_past_triton_head_dim_runs_the_reference(monkeypatch):
    # where "auto" picks Triton (CUDA tensors, or the interpreter without the extension) a head dim past 256 runs the
    # reference: the very same result
    monkeypatch.setattr(backends, "resolve", lambda backend, *a, **k: "triton" if backend == "auto" else backend)
    q, k, v = _inputs(1, 5, 9, 2, 1, 264, torch.float32)
    out = ops.attention(q, k, v, causal=True)
    assert torch.equal(out, reference.attention(q, k, v, causal=True, softmax_scale=264 ** -0.5))
    from fastlm.ops import decode_attention
    lens = torch.tensor([7], device=DEVICE)
    assert torch.equal(decode_attention(q[:, :1], k, v, lens),
                       reference.decode_attention(q[:, :1], k, v, lens, softmax_scale=264 ** -0.5))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernel("attention_fwd")),
                                     "triton"])
def test_numpy_scalars_as_scale_and_window(backend):
    # a scale or window computed with numpy (np.float32, np.int64) is a number like any other
    import numpy as np
    from fastlm.ops import decode_attention
    dev = backend_device(backend)
    q, k, v = (torch.randn(1, 6, 2, 16, device=dev) for _ in "qkv")
    got = ops.attention(q, k, v, causal=True, softmax_scale=np.float32(0.25), window=(np.int64(2), np.int64(0)),
                        backend=backend)
    assert torch.equal(got, ops.attention(q, k, v, causal=True, softmax_scale=0.25, window=(2, 0), backend=backend))
    lens = torch.tensor([5], device=dev)
    got = decode_attention(q[:, :1], k, v, lens, softmax_scale=np.float32(0.25), window_left=np.int64(2),
                           backend=backend)
    assert torch.equal(got, decode_attention(q[:, :1], k, v, lens, softmax_scale=0.25, window_left=2, backend=backend))


def test_fit_head_dim():
    from fastlm.ops._checks import fit_head_dim
    assert fit_head_dim("attention", "triton", "auto", 256) == "triton"
    assert fit_head_dim("attention", "triton", "auto", 257) == "torch"
    assert fit_head_dim("attention", "cpu", "auto", 1000) == "cpu"
    with pytest.raises(ValueError, match="backend='triton' takes headdim 1..256, got 257"):
        fit_head_dim("attention", "triton", "triton", 257)


def test_float64_only_on_reference_backend():
    q, k, v = (t.double() for t in _good())
    out = ops.attention(q, k, v, causal=True, backend="torch")
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        ops.attention(q, k, v, backend="triton")


# --------------------------------------------------------------------------------------------------------------------
# GPU only: large shapes through the autotuned configurations; every candidate configuration
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.timeout(300)  # (autotuning: every candidate compiled and timed)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_large(autotuning, d, causal):
    _check_case("triton", torch.bfloat16, (2, 1031, 2049, 8, 2, d, causal, (-1, -1)))


def _gpu_attention_configs():
    """(kernel, head dim, config) for every candidate configuration of the attention kernels on a
    GPU (the lists the GPU autotuner chooses from, whether or not this process interprets Triton)."""
    from fastlm.kernels import attention as kernels
    real = kernels.interpreter
    kernels.interpreter = lambda: False
    try:
        return [pytest.param(kernel, d, config, id=f"{kernel}-d{d}-config{i}")
                for kernel, make in (("fwd", kernels.fwd_configs), ("bwd_dkdv", kernels.dkdv_configs),
                                     ("bwd_dq", kernels.dq_configs))
                for d, block_d in ((40, 64), (128, 128), (256, 256)) for i, config in enumerate(make(block_d))]
    finally:
        kernels.interpreter = real


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, d, config", _gpu_attention_configs())
def test_every_attention_config(monkeypatch, kernel, d, config):
    """Autotuning may pick any candidate configuration of the attention kernels: each one, forced, gives forward and
    gradients within the rule (the other two kernels at their defaults), on ragged causal and windowed GQA cases."""
    import triton

    from fastlm.kernels import attention as kernels
    raw = getattr(kernels, f"_attn_{kernel}")
    monkeypatch.setattr(kernels, f"_attn_{kernel}_tuned", triton.autotune([config], kernels._AUTOTUNE_KEY)(raw))
    # (a window of 300 holds whole 64- and 128-key tiles for 128-row query blocks: masks skipped inside it)
    for case in ((1, 300, 300, 4, 2, d, True, (-1, -1)), (2, 130, 261, 2, 1, d, False, (50, 20)),
                 (1, 700, 700, 2, 1, d, True, (300, -1))):
        _check_case("triton", torch.bfloat16, case)


def test_attention_config_defaults(monkeypatch):
    """With autotuning off the attention kernels run the first candidate of their head dim's list (the default
    bench/kernel_report.py compiles): the pruning keeps make(block_d)'s candidates in make's order."""
    from fastlm.kernels import attention as kernels
    monkeypatch.setattr(kernels, "interpreter", lambda: False)  # the GPU candidates
    for make in (kernels.fwd_configs, kernels.dkdv_configs, kernels.dq_configs):
        prune, configs = kernels._prune_by_head_dim(make), kernels._all_configs(make)
        for d in (16, 32, 64, 128, 256):
            kept = prune(configs, {}, BLOCK_D=d)
            assert [kernels._config_key(c) for c in kept] == [kernels._config_key(c) for c in make(d)], (make, d)


def test_triton_grid_limits():
    # heads and batch sit on the grid's 65535-limited dimensions: beyond that a clear error, not a failed launch
    from fastlm.kernels.attention import attention_fwd
    from fastlm.kernels.decode import decode_attention_fwd
    q = torch.zeros(65536, 1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"attention \(triton\): batch must be <= 65535, got 65536"):
        attention_fwd(q, q, q, False, 0.25)
    lens = torch.ones(65536, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"decode_attention \(triton\): batch must be <= 65535, got 65536"):
        decode_attention_fwd(q, q, q, lens)
