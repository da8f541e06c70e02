"""The benchmark case lists: which shapes each suite measures, with which implementations and peers.

Shapes per device: on a CPU the ones the CPU targets name (batch 1, 16 heads, head dim 64; the 56M Llama); on a GPU
FlashAttention's benchmark shapes (batch x seqlen = 16k tokens) and the llama-1b-like model. ``--tiny`` (the harness's
own test) shrinks everything. bench/ parametrizes over ``cases(...)`` so pytest-benchmark measures the same cases.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os

import torch
import torch.nn.functional as F

from fastlm import reference
from fastlm.backends import CUDA_HEAD_DIMS, extension
from fastlm.benchmark import (Context, Impl, OpCase, Result, Unavailable, _module_available, attention_flops, cpu_isa,
                              decode_bytes, default_backends, elementwise_bytes, gemm_flops, kernels_isa, mlp_bytes,
                              mlp_flops, run_impls)

# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------


def configure_compile():
    """Each shape is compiled statically; allow more than dynamo's default 8 recompiles of one function."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def randn(gen, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _liger():
    try:
        return importlib.import_module("liger_kernel.transformers.functional")
    except ImportError:
        return None


def cuda_limits(dtype, head_dim: int | None = None, dims=()) -> str | None:
    """Why the CUDA C++ kernels cannot take a case (fp16/bf16 only, their head dims, MLP widths in multiples of 8),
    or None when they can."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernels take fp16/bf16 (tensor cores), not {str(dtype).replace('torch.', '')}"
    if head_dim is not None and head_dim not in CUDA_HEAD_DIMS:
        return f"the CUDA kernels are built for head dims {CUDA_HEAD_DIMS}, not {head_dim}"
    if any(n % 8 for n in dims):
        return f"the CUDA MLP kernels take widths in multiples of 8, not {tuple(dims)}"
    return None


def _unavailable(reason: str):
    def fn(**inputs):
        raise Unavailable(reason)
    return fn


def fastlm_impls(op_name: str, ctx: Context, backends, cuda_limit: str | None = None, **kwargs) -> list[Impl]:
    """One Impl per fastlm backend, ``kwargs`` bound (the case's options, as the reference has them bound).
    Default on a CPU: "cpu", falling back to "torch" where the extension lacks the op. ``cuda_limit`` (cuda_limits'
    answer for the case) makes "cuda" an unavailable row instead of a failed one."""
    fn = getattr(importlib.import_module("fastlm.ops"), op_name)
    chosen = backends or default_backends(ctx.device)
    impls = []
    for b in chosen:
        run = _unavailable(f"fastlm[cuda]: {cuda_limit}") if b == "cuda" and cuda_limit else \
            functools.partial(fn, backend=b, **kwargs)
        impl = Impl(f"fastlm[{b}]", "fastlm", run, backend=b)
        if backends is None and b == "cpu":
            impl.fallback = Impl("fastlm[torch]", "fastlm", functools.partial(fn, backend="torch", **kwargs),
                                 backend="torch")
        impls.append(impl)
    return impls


def peers(ref_fn, ctx: Context, *, compile_here: bool, eager_ok: bool = True, extra=()) -> list[Impl]:
    out = []
    if eager_ok:
        out.append(Impl("eager", "peer", ref_fn))
    out.extend(extra)
    if ctx.compile and compile_here and eager_ok:
        out.append(Impl("compile", "peer", _compiled(ref_fn), compiled=True))
    return out


def _case(op, name, shape, dtype, mode, make, ref, impls, **kw) -> OpCase:
    return OpCase(op=op, name=name, shape=shape, dtype=dtype, mode=mode, make_inputs=make, reference=ref,
                  impls=impls, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------------

_SDPA_GPU = ("flash", "efficient", "cudnn", "math")


def sdpa_attention(q, k, v, *, causal=False, sdpa_backend=None):
    """torch's scaled_dot_product_attention on fastlm's (B, S, H, D) layout (transposed views, no copies), the
    causal mask aligned bottom-right as fastlm's."""
    return sdpa_bhsd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                     sdpa_backend=sdpa_backend)


def bhsd(inputs: dict) -> dict:
    """Attention inputs in SDPA's own layout, (B, H, S, D) contiguous: what a user of SDPA holds (an Impl's
    convert, made outside the timed calls)."""
    return {name: t.transpose(1, 2).contiguous() for name, t in inputs.items()}


def widened(convert=None):
    """An Impl's convert that also widens bf16 / fp16 inputs to fp32 (the CPU peers' fastest way to compute in half
    precision: this CPU's native bf16 paths are slower), once, as a user keeping fp32 copies would."""
    def run(inputs):
        inputs = {k: t.float() if t.is_floating_point() else t for k, t in inputs.items()}
        return inputs if convert is None else convert(inputs)
    return run


def rounded(fn, dtype):
    """fn with its output rounded to ``dtype`` (the case's), as the widened peers return it."""
    def call(**inputs):
        return fn(**inputs).to(dtype)
    return call


def sdpa_bhsd(q, k, v, *, causal=False, sdpa_backend=None):
    """SDPA on q, k, v in its layout (B, H, S, D); the output back in fastlm's (B, S, H, D) (a view)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    Sq, Sk = q.shape[2], k.shape[2]
    kwargs = {"enable_gqa": q.shape[1] != k.shape[1]}
    if causal and Sq == Sk:
        kwargs["is_causal"] = True
    elif causal:
        from torch.nn.attention.bias import causal_lower_right
        kwargs["attn_mask"] = causal_lower_right(Sq, Sk)
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(sdpa_backend)
    with (sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()):
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out.transpose(1, 2)


def _with_cuda_kernels(kernels, fn):
    """fn with the CUDA tensor-core kernels forced to ``kernels`` ("mma" or "wgmma": FASTLM_CUDA_KERNELS) during the
    call."""
    def call(**inputs):
        previous = os.environ.get("FASTLM_CUDA_KERNELS")
        os.environ["FASTLM_CUDA_KERNELS"] = kernels
        try:
            return fn(**inputs)
        finally:
            if previous is None:
                del os.environ["FASTLM_CUDA_KERNELS"]
            else:
                os.environ["FASTLM_CUDA_KERNELS"] = previous
    return call


def _cuda_mma_impl(ctx, impls, wgmma_serves: bool):
    """On a Hopper GPU, with the extension built for sm_90a, "cuda" runs the wgmma kernels where they serve the case
    (``wgmma_serves``): the sm_80 mma.sync kernels are measured beside them as fastlm[cuda-mma]."""
    cuda = [i for i in impls if i.backend == "cuda"]
    if (not cuda or not wgmma_serves or ctx.device.type != "cuda"
            or not getattr(extension(), "with_sm90a", False)
            or torch.cuda.get_device_capability(ctx.device)[0] != 9):
        return []
    return [Impl("fastlm[cuda-mma]", "fastlm", _with_cuda_kernels("mma", cuda[0].fn), backend="cuda")]


def _attention_case(ctx, backends, B, H, Hkv, S, D, causal, dtype, mode, compile_here):
    def make(gen, device):
        return {"q": randn(gen, device, dtype, B, S, H, D), "k": randn(gen, device, dtype, B, S, Hkv, D),
                "v": randn(gen, device, dtype, B, S, Hkv, D)}

    def ref(q, k, v):
        return reference.attention(q, k, v, causal=causal)

    gpu = ctx.device.type == "cuda"
    # the eager reference materializes (B, H, S, S) scores several times over: skip it where that does not fit, or
    # (on a CPU) where its passes over the scores would take most of the quick suite's minutes
    score_bytes = B * H * S * S * 4 * 4 * (3 if mode == "bwd" else 1)
    eager_ok = score_bytes < (24 if gpu else 1) * 2**30
    # forward: SDPA on inputs in its own layout (B, H, S, D); backward: on fastlm's, the gradients' layout
    fwd = mode == "fwd"

    def sdpa_impl(name, backend=None, widen=False):
        fn = functools.partial(sdpa_bhsd if fwd else sdpa_attention, causal=causal, sdpa_backend=backend)
        convert = bhsd if fwd else None
        if widen:
            fn, convert = rounded(fn, dtype), widened(convert)
        return Impl(name, "peer", fn, convert=convert)
    sdpa = [sdpa_impl(f"sdpa-{b}", b) for b in (_SDPA_GPU if gpu else ())]
    if not gpu:
        sdpa = [sdpa_impl("sdpa")] + ([sdpa_impl("sdpa-fp32", widen=True)]
                                      if fwd and dtype in (torch.bfloat16, torch.float16) else [])
    if not eager_ok:
        sdpa = [s for s in sdpa if s.name != "sdpa-math"]
    limit = cuda_limits(dtype, D)
    impls = fastlm_impls("attention", ctx, backends, cuda_limit=limit, causal=causal)
    impls += _cuda_mma_impl(ctx, impls, mode == "fwd" and limit is None) + sdpa
    impls += peers(ref, ctx, compile_here=compile_here, eager_ok=eager_ok)
    name = f"B{B} H{H}" + (f"/{Hkv}" if Hkv != H else "") + f" S{S} D{D}" + (" causal" if causal else "")
    shape = {"batch": B, "nheads": H, "nheads_kv": Hkv, "seqlen": S, "headdim": D, "causal": causal}
    case = _case("attention", name, shape, dtype, mode, make, ref, impls,
                 flops=attention_flops(B, H, S, S, D, causal=causal, mode=mode), grad_inputs=("q", "k", "v"))
    # the float64 reference needs ~10 (B, H, S, S) float64 buffers: check big shapes at a smaller seqlen
    if B * H * S * S > 2**25:
        small = max(64, int(math.sqrt(2**25 / (B * H))) // 64 * 64)
        case.check_case = _attention_case(ctx, backends, B, H, Hkv, min(S, small), D, causal, dtype, mode, False)
        if mode == "fwd":
            case.spot_check = functools.partial(_attention_last_rows, causal=causal)
    return case


def _attention_last_rows(outputs, inputs, *, causal, rows=64):
    """The output of the last ``rows`` queries of the last sequence and head at the full length, and the reference's
    for them (float64 and the inputs' dtype): the keys of one head against a few queries, small at any length
    (bottom-right causal alignment: those queries are the last positions either way)."""
    q, k, v = inputs["q"][-1:, -rows:, -1:], inputs["k"][-1:, :, -1:], inputs["v"][-1:, :, -1:]
    got = outputs[0][-1:, -rows:, -1:]
    ref64 = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    return got, ref64, reference.attention(q, k, v, causal=causal)


def attention_cases(ctx, backends, dtypes):
    gpu = ctx.device.type == "cuda"
    grid = []   # (B, H, Hkv, S, D, causal, dtype, mode, compile_here)
    if ctx.tiny:
        grid = [(1, 2, 2, s, 16, True, torch.float32, "fwd", s == 64) for s in (32, 64)]
        grid += [(1, 2, 1, 48, 16, True, torch.float32, "bwd", False)]
    elif gpu:
        seqs = (1024, 2048, 4096, 8192, 16384) if ctx.suite == "quick" else (512, 1024, 2048, 4096, 8192, 16384)
        for dt in (torch.bfloat16,) if ctx.suite == "quick" else (torch.bfloat16, torch.float16):
            for D in (128,) if ctx.suite == "quick" else (64, 128):
                H = 2048 // D
                for causal in (True, False):
                    for mode in ("fwd", "bwd"):
                        sweep = seqs if (causal and mode == "fwd") or ctx.suite == "full" else (4096, 16384)
                        grid += [(max(1, 16384 // s), H, H, s, D, causal, dt, mode, causal and s == 4096)
                                 for s in sweep]
        if ctx.suite == "quick":
            grid += [(4, 32, 8, 4096, 64, True, torch.bfloat16, "fwd", False),
                     (2, 16, 16, 8192, 128, True, torch.float16, "fwd", False)]
    else:
        B, H, D = 1, 16, 64
        if ctx.suite == "quick":
            grid = [(B, H, H, s, D, True, torch.float32, "fwd", s == 1024) for s in (256, 512, 1024, 2048)]
            grid += [(B, H, H, s, D, False, torch.float32, "fwd", False) for s in (512, 2048)]
            grid += [(B, H, H, 2048, D, c, torch.bfloat16, "fwd", False) for c in (True, False)]
            grid += [(B, H, H, 1024, D, True, torch.float32, "bwd", False)]
        else:
            for dt in (torch.float32, torch.bfloat16):
                for D in (64, 128):
                    for causal in (True, False):
                        for mode in ("fwd", "bwd"):
                            grid += [(B, 2048 // D // 2, 2048 // D // 2, s, D, causal, dt, mode, s == 1024)
                                     for s in (128, 256, 512, 1024, 2048)]
            grid += [(B, 16, 4, s, 64, True, torch.float32, "fwd", False) for s in (512, 2048)]
    return [_attention_case(ctx, backends, *g) for g in grid if dtypes is None or g[6] in dtypes]


# ----------------------------------------------------------------------------------------------------------------------
# Decode attention
# ----------------------------------------------------------------------------------------------------------------------

def decode_layout(inputs: dict) -> dict:
    """A decode case's inputs as a user of SDPA holds them: the caches in (B, Hkv, S_max, D) (transformers' cache
    layout) and the new token's queries grouped by kv head, (B, Hkv, H / Hkv, D): GQA as one SDPA call without
    repeating K / V, each kv head's queries a block of rows."""
    q, k, v = inputs["q"], inputs["k_cache"], inputs["v_cache"]
    B, Sq, H, D = q.shape
    if Sq != 1:
        raise ValueError(f"decode_layout groups one new token's queries; got {Sq} per sequence")
    Hkv = k.shape[2]
    return {"q": q[:, 0].reshape(B, Hkv, H // Hkv, D).contiguous(), "k_cache": k.transpose(1, 2).contiguous(),
            "v_cache": v.transpose(1, 2).contiguous(), "cache_seqlens": inputs["cache_seqlens"]}


def sdpa_decode(q, k_cache, v_cache, cache_seqlens, *, length: int):
    """The PyTorch way to attend over a cache whose sequences all have the same length, on decode_layout's inputs:
    SDPA of the grouped queries against a slice of ``length`` keys, known on the host (reading cache_seqlens would
    wait for the GPU inside the timed call). Returns fastlm's (B, 1, H, D)."""
    B, Hkv, G, D = q.shape
    out = F.scaled_dot_product_attention(q, k_cache[:, :, :length], v_cache[:, :, :length])
    return out.reshape(B, 1, Hkv * G, D)


def _decode_case(ctx, backends, B, H, Hkv, ctxlen, D, dtype):
    def make(gen, device):
        return {"q": randn(gen, device, dtype, B, 1, H, D), "k_cache": randn(gen, device, dtype, B, ctxlen, Hkv, D),
                "v_cache": randn(gen, device, dtype, B, ctxlen, Hkv, D),
                "cache_seqlens": torch.full((B,), ctxlen, dtype=torch.int32, device=device)}

    impls = fastlm_impls("decode_attention", ctx, backends, cuda_limit=cuda_limits(dtype, D)) + [
        Impl("sdpa", "peer", functools.partial(sdpa_decode, length=ctxlen), convert=decode_layout),
                                                               Impl("eager", "peer", reference.decode_attention)]
    name = f"B{B} H{H}/{Hkv} ctx{ctxlen} D{D}"
    shape = {"batch": B, "nheads": H, "nheads_kv": Hkv, "context": ctxlen, "headdim": D}
    itemsize = torch.empty((), dtype=dtype).element_size()
    return _case("decode", name, shape, dtype, "fwd", make, reference.decode_attention, impls,
                 bytes=decode_bytes(B, ctxlen, H, Hkv, D, itemsize))


def decode_cases(ctx, backends, dtypes):
    gpu = ctx.device.type == "cuda"
    if ctx.tiny:
        grid = [(1, 4, 2, c, 16, torch.float32) for c in (64, 128)]
    elif gpu:
        ctxs = (4096, 16384, 65536, 131072) if ctx.suite == "quick" else (1024, 4096, 16384, 32768, 65536, 131072)
        grid = [(1, 32, 8, c, 128, torch.bfloat16) for c in ctxs]
        grid += [(16, 32, 8, c, 128, torch.bfloat16) for c in (4096, 16384)]
        if ctx.suite == "full":
            grid += [(1, 32, 8, c, 128, torch.float16) for c in ctxs]
    else:
        ctxs = (1024, 4096, 16384) if ctx.suite == "quick" else (512, 1024, 2048, 4096, 8192, 16384, 32768)
        grid = [(1, 32, 8, c, 128, torch.float32) for c in ctxs]
        grid += [(1, 32, 8, 16384, 128, torch.bfloat16)]
        if ctx.suite == "full":
            grid += [(4, 8, 4, c, 64, torch.float32) for c in (1024, 4096)]
    return [_decode_case(ctx, backends, *g) for g in grid if dtypes is None or g[5] in dtypes]


# ----------------------------------------------------------------------------------------------------------------------
# FFN
# ----------------------------------------------------------------------------------------------------------------------

def _liger_swiglu(x, w_gate, w_up, w_down, residual=None):
    lg = _liger()
    if lg is None:
        raise Unavailable("liger-kernel is not installed")
    y = F.linear(lg.liger_swiglu(F.linear(x, w_gate), F.linear(x, w_up)), w_down)
    return y if residual is None else y + residual


def _cublaslt_gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, residual=None):
    """The GPT-2 MLP on cuBLASLt's fused epilogues (the alternative to fastlm's own GEMMs): the up projection through
    torch._addmm_activation (GELU_BIAS epilogue, tanh GELU), the down projection through addmm (bias epilogue), then
    the residual add."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b_proj, torch._addmm_activation(b_fc, x2, w_fc.t(), use_gelu=True), w_proj.t())
    if residual is not None:
        y += residual.reshape(y.shape)
    return y.reshape(*x.shape[:-1], y.shape[-1])


DECODE_TOKENS = 16  # MLP cases of at most this many tokens are decode steps (weight-streaming, rated in GB/s)


def _ffn_case(ctx, backends, kind, T, d, f, dtype, mode, compile_here):
    def make(gen, device):
        inp = {"x": randn(gen, device, dtype, T, d)}
        if kind == "gelu":
            inp.update(w_fc=randn(gen, device, dtype, f, d, scale=d ** -0.5), b_fc=randn(gen, device, dtype, f),
                       w_proj=randn(gen, device, dtype, d, f, scale=f ** -0.5), b_proj=randn(gen, device, dtype, d))
        else:
            inp.update(w_gate=randn(gen, device, dtype, f, d, scale=d ** -0.5),
                       w_up=randn(gen, device, dtype, f, d, scale=d ** -0.5),
                       w_down=randn(gen, device, dtype, d, f, scale=f ** -0.5))
        inp["residual"] = randn(gen, device, dtype, T, d)
        return inp

    op = "mlp_gelu" if kind == "gelu" else "mlp_swiglu"
    ref = getattr(reference, op)
    extra = []
    if ctx.device.type == "cuda" and kind == "swiglu":
        extra = [Impl("liger", "peer", _liger_swiglu)]
    elif ctx.device.type == "cuda" and mode == "fwd":  # (torch._addmm_activation has no backward)
        extra = [Impl("cublaslt", "peer", _cublaslt_gelu_mlp)]
    elif mode == "fwd" and dtype in (torch.bfloat16, torch.float16):     # a CPU: fp32 arithmetic is the faster way
        extra = [Impl("eager-fp32", "peer", rounded(ref, dtype), convert=widened())]
    limit = cuda_limits(dtype, dims=(d, f))
    impls = fastlm_impls(op, ctx, backends, cuda_limit=limit)
    impls += _cuda_mma_impl(ctx, impls, mode == "fwd" and limit is None) + peers(ref, ctx, compile_here=compile_here,
                                                                                  extra=extra)
    grads = ("x", "w_fc", "b_fc", "w_proj", "b_proj", "residual") if kind == "gelu" else \
        ("x", "w_gate", "w_up", "w_down", "residual")
    # a decode step's few tokens are bound by reading the weights: rated in GB/s against the copy
    rate = ({"bytes": mlp_bytes(T, d, f, kind, torch.finfo(dtype).bits // 8)} if T <= DECODE_TOKENS and mode == "fwd"
            else {"flops": mlp_flops(T, d, f, kind, mode=mode)})
    return _case("ffn", f"{op} T{T} d{d} f{f}", {"tokens": T, "d_model": d, "intermediate": f, "kind": kind},
                 dtype, mode, make, ref, impls, grad_inputs=grads, **rate)


def ffn_cases(ctx, backends, dtypes):
    gpu = ctx.device.type == "cuda"
    if ctx.tiny:
        grid = [("swiglu", 16, 32, 64, torch.float32, "fwd", True), ("gelu", 16, 32, 64, torch.float32, "bwd", False)]
    elif gpu:
        grid = [("swiglu", 8192, 4096, 14336, torch.bfloat16, m, m == "fwd") for m in ("fwd", "bwd")]
        grid += [("gelu", 8192, 1600, 6400, torch.bfloat16, m, False) for m in ("fwd", "bwd")]
        # decode steps of a llama-1b-like model at batch 1 and 16: weight-streaming
        grid += [("swiglu", T, 2048, 8192, torch.bfloat16, "fwd", False) for T in (1, DECODE_TOKENS)]
        if ctx.suite == "full":
            grid += [("swiglu", 8192, 2048, 8192, dt, m, False) for dt in (torch.bfloat16, torch.float16)
                     for m in ("fwd", "bwd")]
    else:
        grid = [("swiglu", 512, 512, 1408, torch.float32, "fwd", True), ("swiglu", 512, 512, 1408, torch.bfloat16,
                                                                          "fwd", False),
                ("gelu", 512, 768, 3072, torch.float32, "fwd", False), ("swiglu", 512, 512, 1408, torch.float32,
                                                                        "bwd", False)]
        if ctx.suite == "full":
            grid += [("gelu", 512, 768, 3072, dt, m, False) for dt in (torch.bfloat16, torch.float32)
                     for m in ("fwd", "bwd")]
            grid += [("swiglu", 2048, 512, 1408, torch.float32, m, False) for m in ("fwd", "bwd")]
    return [_ffn_case(ctx, backends, *g) for g in grid if dtypes is None or g[4] in dtypes]


def _missing(op, dtype, reason) -> OpCase:
    return OpCase(op=op, name="-", shape={}, dtype=dtype, mode="fwd", make_inputs=None, reference=None, impls=[],
                  skip_reason=reason)


# ----------------------------------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------------------------------

def _torch_rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _torch_layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _liger_rms_norm(x, weight, eps=1e-6):
    lg = _liger()
    if lg is None:
        raise Unavailable("liger-kernel is not installed")
    return lg.liger_rms_norm(x, weight, eps, in_place=False)


def _add_rms_reference(x, residual, weight, eps=1e-6):
    return reference.add_norm(x, residual, weight, None, eps, kind="rms")


def _norm_case(ctx, backends, kind, T, d, dtype, mode, compile_here):
    def make(gen, device):
        inp = {"x": randn(gen, device, dtype, T, d), "weight": randn(gen, device, dtype, d)}
        if kind == "layer_norm":
            inp["bias"] = randn(gen, device, dtype, d)
        if kind == "add_rms_norm":
            inp["residual"] = randn(gen, device, dtype, T, d)
        return inp

    gpu = ctx.device.type == "cuda"
    if kind == "rms_norm":
        ref, extra = reference.rms_norm, [Impl("torch", "peer", _torch_rms_norm)]
        extra += [Impl("liger", "peer", _liger_rms_norm)] if gpu else []
        reads, writes = T * d + d, T * d
    elif kind == "layer_norm":
        ref, extra = reference.layer_norm, [Impl("torch", "peer", _torch_layer_norm)]
        reads, writes = T * d + 2 * d, T * d
    else:
        ref, extra = _add_rms_reference, []
        reads, writes = 2 * T * d + d, 2 * T * d
    if mode == "bwd":                     # read x (or h), dy, weight; write dx (and the weight's gradient)
        reads, writes = 2 * T * d + d, T * d + d
        if kind == "add_rms_norm":        # also the gradient of h, the second output
            reads += T * d
    itemsize = torch.empty((), dtype=dtype).element_size()
    impls = fastlm_impls(kind, ctx, backends) + peers(ref, ctx, compile_here=compile_here, extra=extra)
    grads = ("x", "weight") + (("bias",) if kind == "layer_norm" else ()) + (("residual",) if kind == "add_rms_norm"
                                                                           else ())
    return _case("norm", f"{kind} T{T} d{d}", {"tokens": T, "d_model": d, "kind": kind}, dtype, mode, make, ref,
                 impls, bytes=elementwise_bytes(reads, writes, itemsize), grad_inputs=grads)


def norm_cases(ctx, backends, dtypes):
    gpu = ctx.device.type == "cuda"
    if ctx.tiny:
        grid = [("rms_norm", 64, 48, torch.float32, "fwd", True), ("layer_norm", 64, 48, torch.float32, "bwd", False)]
    elif gpu:
        T, d = 16384, 4096
        grid = [("rms_norm", T, d, torch.bfloat16, m, m == "fwd") for m in ("fwd", "bwd")]
        grid += [("layer_norm", T, d, torch.bfloat16, "fwd", False), ("add_rms_norm", T, d, torch.bfloat16, "fwd",
                                                                      False)]
    else:
        T, d = 8192, 1024
        grid = [("rms_norm", T, d, torch.float32, "fwd", True), ("rms_norm", T, d, torch.bfloat16, "fwd", False),
                ("layer_norm", T, d, torch.float32, "fwd", False), ("add_rms_norm", T, d, torch.float32, "fwd", False),
                ("rms_norm", T, d, torch.float32, "bwd", False)]
    if ctx.suite == "full" and not ctx.tiny:
        grid += [(k, T, d, dt, m, False) for k in ("layer_norm", "add_rms_norm") for dt in (torch.bfloat16,)
                 for m in ("fwd", "bwd")]
    return [_norm_case(ctx, backends, *g) for g in grid if dtypes is None or g[3] in dtypes]


# ----------------------------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------------------------

def _rope_case(ctx, backends, B, S, H, D, dtype, mode, compile_here):
    def make(gen, device):
        cos, sin = reference.rope_cos_sin(torch.arange(S, device=device), D, 10000.0, dtype)
        return {"x": randn(gen, device, dtype, B, S, H, D), "cos": cos, "sin": sin}

    itemsize = torch.empty((), dtype=dtype).element_size()
    reads = B * S * H * D + 2 * S * D
    impls = fastlm_impls("apply_rope", ctx, backends) + peers(reference.apply_rope, ctx, compile_here=compile_here)
    return _case("rope", f"B{B} S{S} H{H} D{D}", {"batch": B, "seqlen": S, "nheads": H, "headdim": D}, dtype, mode,
                 make, reference.apply_rope, impls, bytes=elementwise_bytes(reads, B * S * H * D, itemsize),
                 grad_inputs=("x",))


def rope_cases(ctx, backends, dtypes):
    if ctx.tiny:
        grid = [(1, 32, 2, 16, torch.float32, "fwd", True)]
    elif ctx.device.type == "cuda":
        grid = [(4, 4096, 32, 128, torch.bfloat16, m, m == "fwd") for m in ("fwd", "bwd")]
    else:                                   # compiling costs more than it tells on a CPU: only in the full suite
        grid = [(1, 4096, 16, 64, torch.float32, "fwd", ctx.suite == "full"),
                (1, 4096, 16, 64, torch.bfloat16, "fwd", False),
                (1, 4096, 16, 64, torch.float32, "bwd", False)]
    return [_rope_case(ctx, backends, *g) for g in grid if dtypes is None or g[4] in dtypes]


# ----------------------------------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------------------------------

def _torch_cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, ignore_index=-100)


def _torch_linear_cross_entropy(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight), targets, ignore_index=-100)


def _liger_cross_entropy(logits, targets):
    lg = _liger()
    if lg is None:
        raise Unavailable("liger-kernel is not installed")
    return lg.liger_cross_entropy(logits, targets, ignore_index=-100)


def _liger_linear_cross_entropy(x, weight, targets):
    lg = _liger()
    if lg is None:
        raise Unavailable("liger-kernel is not installed")
    return lg.liger_fused_linear_cross_entropy(x, weight, targets, ignore_index=-100)


def _targets(gen, device, N, V):
    t = torch.randint(0, V, (N,), generator=gen, device=device)
    return torch.where(torch.rand(N, generator=gen, device=device) < 0.1, torch.full_like(t, -100), t)


def _ce_case(ctx, backends, kind, N, d, V, dtype, mode, compile_here):
    gpu = ctx.device.type == "cuda"
    itemsize = torch.empty((), dtype=dtype).element_size()
    if kind == "cross_entropy":
        def make(gen, device):
            return {"logits": randn(gen, device, dtype, N, V, scale=2.0), "targets": _targets(gen, device, N, V)}

        ref = reference.cross_entropy
        extra = [Impl("torch", "peer", _torch_cross_entropy)]
        extra += [Impl("liger", "peer", _liger_cross_entropy)] if gpu else []
        work = {"bytes": elementwise_bytes(N * V, N * V if mode == "bwd" else N, itemsize)}
        grads, name, shape = ("logits",), f"cross_entropy N{N} V{V}", {"tokens": N, "vocab": V}
    else:
        def make(gen, device):
            return {"x": randn(gen, device, dtype, N, d), "weight": randn(gen, device, dtype, V, d, scale=d ** -0.5),
                    "targets": _targets(gen, device, N, V)}

        ref = reference.linear_cross_entropy
        extra = [Impl("torch", "peer", _torch_linear_cross_entropy)]
        extra += [Impl("liger", "peer", _liger_linear_cross_entropy)] if gpu else []
        work = {"flops": gemm_flops(N, V, d) * {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}[mode]}
        grads, name, shape = ("x", "weight"), f"linear_cross_entropy N{N} d{d} V{V}", {"tokens": N, "d_model": d,
                                                                                      "vocab": V}
    impls = fastlm_impls(kind, ctx, backends) + peers(ref, ctx, compile_here=compile_here, extra=extra)
    return _case("cross_entropy", name, shape, dtype, mode, make, ref, impls, grad_inputs=grads, **work)


def cross_entropy_cases(ctx, backends, dtypes):
    if ctx.tiny:
        grid = [("cross_entropy", 16, 0, 1000, torch.float32, "fwd", True),
                ("linear_cross_entropy", 16, 32, 1000, torch.float32, "fwd_bwd", False)]
    elif ctx.device.type == "cuda":
        # the fused linear + cross-entropy forms its gradients in the forward: timed forward + backward
        grid = [("cross_entropy", 8192, 0, 128256, torch.bfloat16, m, m == "fwd") for m in ("fwd", "bwd")]
        grid += [("linear_cross_entropy", 8192, 2048, 128256, torch.bfloat16, m, False) for m in ("fwd", "fwd_bwd")]
    else:
        grid = [("cross_entropy", 1024, 0, 32000, torch.float32, "fwd", ctx.suite == "full"),
                ("cross_entropy", 1024, 0, 32000, torch.bfloat16, "fwd", False),
                ("cross_entropy", 1024, 0, 32000, torch.float32, "bwd", False),
                ("linear_cross_entropy", 1024, 512, 32000, torch.float32, "fwd_bwd", False)]
        if ctx.suite == "full":
            grid += [("linear_cross_entropy", 1024, 512, 32000, torch.float32, "fwd", False)]
    return [_ce_case(ctx, backends, *g) for g in grid if dtypes is None or g[4] in dtypes]


# ----------------------------------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------------------------------

class ModelCase:
    """One whole-model measurement: "prefill" (forward logits), "decode" (greedy generate) or "train" (forward +
    backward of the loss) of fastlm.Transformer against transformers (sdpa), the eager and compiled reference."""

    op = "model"

    def __init__(self, ctx, backends, preset, kind, batch, seqlen, dtype, new_tokens=0, peers_=("transformers",
                                                                                               "eager", "compile")):
        self.preset, self.kind, self.batch, self.seqlen, self.dtype = preset, kind, batch, seqlen, dtype
        self.new_tokens = new_tokens
        # the headline figures: a median of at least five rounds on a CPU, even when a round outlasts the budget (on
        # a GPU, where rounds vary less, three: the GPU check's bench has three minutes for every op)
        self.min_reps = 3 if ctx.device.type == "cuda" else 5
        self._want = None  # the greedy tokens of transformers (decode), generated once per case
        self.peer_names = [p for p in peers_ if p != "compile" or ctx.compile]
        self.name = f"{preset} {kind} {batch}x{seqlen}" + (f"+{new_tokens}" if kind == "decode" else "")
        self.mode = kind
        self.shape = {"model": preset, "kind": kind, "batch": batch, "seqlen": seqlen, "new_tokens": new_tokens}
        self.impls = self._fastlm_impls(ctx, backends) + [Impl(p, "peer", None) for p in self.peer_names]
        if kind == "decode" and ctx.device.type == "cuda":
            # the decode step without a launch cost per kernel: captured in a CUDA graph (generate(cuda_graph=True);
            # the capture, about one step's cost, is inside every timed call); in the full suite also compiled with
            # CUDA graphs (generate(compile=True): minutes of compilation, once)
            base = [i for i in self.impls if i.kind == "fastlm"]
            self.impls += [Impl(f"{i.name}+graphs", "fastlm", None, backend=i.backend, cuda_graph=True) for i in base]
            if ctx.suite == "full" and ctx.compile:
                self.impls += [Impl(f"{i.name}+compile", "fastlm", None, backend=i.backend, compiled=True)
                               for i in base]

    @staticmethod
    def _fastlm_impls(ctx, backends):
        """The model passes one backend to every op. By default: "triton" on a GPU; on a CPU "auto", which is the C++
        kernels for the ops the extension serves and the reference for the others (never the interpreter: checked
        when it runs)."""
        if backends:
            return [Impl(f"fastlm[{b}]", "fastlm", None, backend=b) for b in backends]
        if ctx.device.type == "cuda":
            return [Impl("fastlm[triton]", "fastlm", None, backend="triton")]
        from fastlm import backends as fb
        return [Impl("fastlm[cpu]" if fb.extension() is not None else "fastlm[torch]", "fastlm", None,
                     backend="auto")]

    # -- models, shared by the cases of one preset and dtype ---------------------------------------------------------

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def models(preset, dtype, device_type):
        """(hf, fastlm model, reference model) with identical weights: a random transformers Llama converted by
        fastlm.from_hf; the reference loads fastlm's state dict (same names)."""
        import transformers

        import fastlm
        cfg = fastlm.Config.from_name(preset)
        if cfg.family != "llama":
            raise Unavailable(f"model benchmarks use Llama presets, got {preset} ({cfg.family})")
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            max_position_embeddings=cfg.max_seqlen, rms_norm_eps=cfg.norm_eps, head_dim=cfg.head_dim,
            rope_parameters={"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_base},
            tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device(device_type):                     # initialise on the device: fast for 1B parameters
            hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
            hf.generation_config.eos_token_id = None        # random weights: never stop early
            hf.generation_config.pad_token_id = 0
            fast = fastlm.from_hf(hf).eval()
            ref = reference.Transformer(fast.config).to(dtype=dtype).eval()
        ref.load_state_dict(fast.state_dict())
        return hf, fast, ref

    def _tokens(self, gen, device, vocab, batch, seqlen):
        return torch.randint(0, vocab, (batch, seqlen), generator=gen, device=device)

    # -- running -------------------------------------------------------------------------------------------------

    def base_result(self, impl):
        return Result(op="model", case=self.name, shape=self.shape, dtype=str(self.dtype).replace("torch.", ""),
                      mode=self.kind, impl=impl.name, kind=impl.kind, backend=impl.backend)

    def run(self, ctx, progress=None):
        return run_impls(self, ctx, progress)

    def prepare(self, impl, ctx):
        """Check ``impl`` (logits, loss or greedy tokens), then return (result so far, [timed closure])."""
        hf, fast, ref = self.models(self.preset, self.dtype, ctx.device.type)
        res = self.base_result(impl)
        call = getattr(self, f"_prepare_{self.kind}")(impl, res, ctx, hf, fast, ref)
        res.status = "wrong" if res.correct is False else "ok"
        return res, [call]

    def finalize(self, res, ctx):
        if self.kind == "train" and ctx.device.type == "cuda":
            res.peak_mem_bytes = int(torch.cuda.max_memory_allocated(ctx.device) - self._mem_base)
        for model in self.models(self.preset, self.dtype, ctx.device.type):
            model.zero_grad(set_to_none=True)

    def _forward_fn(self, impl, hf, fast, ref):
        if impl.kind == "fastlm":
            _use_backend(fast, impl.backend)

            def fast_fn(tokens, targets=None):
                fast.backend = impl.backend             # the implementations of a case are timed in rotation
                return fast(tokens, targets)
            return fast_fn
        if impl.name == "transformers":
            def hf_fn(tokens, targets=None):
                if targets is None:
                    return hf(input_ids=tokens, use_cache=False).logits
                return hf(input_ids=tokens, labels=targets, shift_labels=targets, use_cache=False).loss
            return hf_fn
        if impl.name == "eager":
            return lambda tokens, targets=None: ref(tokens, targets)
        compiled = _compiled_model(ref)
        return lambda tokens, targets=None: compiled(tokens, targets)

    def _flops_per_token(self, cfg, seqlen, train):
        """2 FLOPs per weight per token (non-embedding weights plus the LM head) + causal attention."""
        weights = cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model
        attn = attention_flops(1, cfg.n_head, seqlen, seqlen, cfg.head_dim, causal=True) * cfg.n_layer / seqlen
        return (3.0 if train else 1.0) * (2.0 * weights + attn)

    def _check_logits(self, fn, res, ref, tokens, full):
        """The numerics rule on the logits of the first (at most) 128 tokens of the first sequence, or of all the
        tokens (``full``: a compiled model is checked at the shape it was compiled for)."""
        t = tokens if full else tokens[:1, :128]
        with torch.no_grad():
            res.correct, res.max_err, res.ref_err = self._judge_logits("logits", fn(t), ref(t), _float64_copy(ref)(t))
        res.check = f"logits, {t.shape[0]}x{t.shape[1]} tokens"

    def _judge_logits(self, name, out, ref_low, ref64):
        """(rule passed, error, the reference's own error) for logits: the atol at this dtype per unit of the
        largest logit (the rule's default takes fp32's, as they are compared in fp32)."""
        from fastlm import testing
        return testing.passes_rule(name, out.float(), ref64, ref_low.float(),
                                   atol=testing.ATOL.get(self.dtype, 1e-6) * float(ref64.abs().max()))

    def _check_decode_step(self, fast, ref, prompt):
        """fastlm's decode step (the prompt's first 128 tokens of the first sequence, then one token through the KV
        cache: the kernels every generated token runs) by the numerics rule on its logits against the reference's
        at that position. At 16-bit precision greedy tokens may flip on a near-tie; the logits may not drift."""
        p = prompt[:1, :128]
        with torch.no_grad():
            fast.setup_cache(1, p.shape[1] + 1)
            try:
                nxt = fast(p)[:, -1].argmax(-1, keepdim=True)
                out = fast(nxt, input_pos=torch.full((1,), p.shape[1], device=p.device))[:, -1]
            finally:
                fast.clear_cache()
            seq = torch.cat([p, nxt], dim=1)
            return self._judge_logits("decode logits", out, ref(seq)[:, -1], _float64_copy(ref)(seq)[:, -1])

    def _prepare_prefill(self, impl, res, ctx, hf, fast, ref):
        cfg = fast.config
        gen = torch.Generator(device=ctx.device).manual_seed(1)
        tokens = self._tokens(gen, ctx.device, cfg.vocab_size, self.batch, self.seqlen)
        fn = self._forward_fn(impl, hf, fast, ref)
        self._check_logits(fn, res, ref, tokens, full=impl.name == "compile")
        res.tokens = float(self.batch * self.seqlen)
        res.flops = res.tokens * self._flops_per_token(cfg, self.seqlen, False)

        def call():
            with torch.no_grad():
                fn(tokens)
        return call

    def _prepare_train(self, impl, res, ctx, hf, fast, ref):
        from fastlm import testing
        cfg = fast.config
        gen = torch.Generator(device=ctx.device).manual_seed(2)
        tokens = self._tokens(gen, ctx.device, cfg.vocab_size, self.batch, self.seqlen + 1)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        fn = self._forward_fn(impl, hf, fast, ref)
        module = fast if impl.kind == "fastlm" else (hf if impl.name == "transformers" else ref)
        xs, ys = (x, y) if impl.name == "compile" else (x[:1, :128], y[:1, :128])
        loss = fn(xs, ys).detach()  # with autograd on, as timed (fastlm's loss then takes its fused backward path)
        with torch.no_grad():
            ref_low, ref64 = ref(xs, ys), _float64_copy(ref)(xs, ys)
        res.correct, res.max_err, res.ref_err = testing.passes_rule("loss", loss.float(), ref64, ref_low.float())
        res.check = f"loss, {xs.shape[0]}x{xs.shape[1]} tokens"
        params = [p for p in module.parameters() if p.requires_grad]

        def call():
            for p in params:
                p.grad = None
            fn(x, y).backward()
        if ctx.device.type == "cuda":
            # peak = this model's weights + what one step allocates on top (the other models resident here excluded)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
            weights = sum(p.numel() * p.element_size() for p in module.parameters())
            self._mem_base = torch.cuda.memory_allocated(ctx.device) - weights
        res.tokens = float(self.batch * self.seqlen)
        res.flops = res.tokens * self._flops_per_token(cfg, self.seqlen, True)
        return call

    def _prepare_decode(self, impl, res, ctx, hf, fast, ref):
        if impl.name in ("eager", "compile"):
            raise Unavailable("the reference model has no KV cache: not a decode peer")
        cfg = fast.config
        gen = torch.Generator(device=ctx.device).manual_seed(3)
        prompt = self._tokens(gen, ctx.device, cfg.vocab_size, self.batch, self.seqlen)
        n = self.new_tokens
        if impl.kind == "fastlm":
            _use_backend(fast, impl.backend)

            def fn():
                fast.backend = impl.backend
                return fast.generate(prompt, max_new_tokens=n, compile=impl.compiled, cuda_graph=impl.cuda_graph)
        else:
            def fn():
                with torch.no_grad():
                    return hf.generate(prompt, max_new_tokens=n, do_sample=False)
        got = fn()[:, -n:].cpu()
        if self._want is None:
            with torch.no_grad():
                self._want = hf.generate(prompt, max_new_tokens=n, do_sample=False)[:, -n:].cpu()
        want = self._want
        differ = int((got != want).sum())
        res.max_err = differ / got.numel()
        res.check = f"greedy tokens vs transformers: {differ}/{got.numel()} differ"
        # greedy sequences must agree exactly in fp32; at 16-bit precision near-ties may legitimately flip, so there
        # fastlm's decode step is held to the numerics rule on its logits instead (transformers' is not judged)
        res.correct = (differ == 0) if self.dtype == torch.float32 else None
        if impl.kind == "fastlm" and self.dtype != torch.float32:
            res.correct, res.max_err, res.ref_err = self._check_decode_step(fast, ref, prompt)
            res.check = f"decode-step logits after {min(self.seqlen, 128)} tokens; {res.check}"
        res.tokens = float(self.batch * n)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        weights = cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model     # read once per step
        kv = 2 * cfg.n_layer * self.batch * (self.seqlen + n / 2) * cfg.n_kv_head * cfg.head_dim
        res.bytes = n * (weights + kv) * itemsize
        res.bound = "memory"
        return fn


def _use_backend(model, backend):
    from fastlm import backends
    if backend == "auto" and backends.interpreter() and not torch.cuda.is_available():
        raise Unavailable("TRITON_INTERPRET=1 would make backend='auto' run the Triton interpreter, which is never "
                          "timed: unset it")
    model.backend = backend


@functools.lru_cache(maxsize=2)
def _float64_copy(model):
    import copy
    return copy.deepcopy(model).to(torch.float64)


@functools.lru_cache(maxsize=2)
def _compiled_model(model):
    return torch.compile(model, dynamic=False)


def model_cases(ctx, backends, dtypes):
    gpu = ctx.device.type == "cuda"
    grid = []   # (preset, kind, batch, seqlen, dtype, new_tokens, peers)
    if ctx.tiny:
        grid = [("llama-tiny", "prefill", 1, 32, torch.float32, 0, ("transformers", "eager", "compile")),
                ("llama-tiny", "train", 2, 16, torch.float32, 0, ("transformers",)),
                ("llama-tiny", "decode", 1, 8, torch.float32, 8, ("transformers",))]
    elif gpu:
        p = "llama-1b-like"
        # torch.compile of a 1B model takes minutes: the compiled peers in the full suite only
        full = ctx.suite == "full"
        compiled = ("compile",) if full else ()
        n = 128 if full else 32
        grid = [(p, "train", 4, 2048, torch.bfloat16, 0, ("transformers",) + compiled),
                (p, "prefill", 4, 2048, torch.bfloat16, 0, ("transformers",) + compiled),
                (p, "decode", 1, 128, torch.bfloat16, n, ("transformers",)),
                (p, "decode", 16, 128, torch.bfloat16, n, ("transformers",))]
    else:
        p = "llama-56m"
        full = ctx.suite == "full"
        peers_fp32 = ("transformers", "eager") + (("compile",) if full else ())
        grid = [(p, "prefill", 1, 1024, torch.float32, 0, peers_fp32),
                (p, "decode", 1, 16, torch.float32, 128 if full else 32, ("transformers",))]
        # bf16 prefill: ~0.4 s a run on a CPU with the bf16 dot products, ~6 s (fastlm and transformers alike)
        # without them, where only the full suite takes it
        if full or "AVX512-BF16" in set(cpu_isa()) & set(kernels_isa() or ()):
            grid += [(p, "prefill", 1, 1024, torch.bfloat16, 0, ("transformers", "eager"))]
        if full:
            grid += [(p, "decode", 16, 16, torch.float32, 64, ("transformers",)),
                     (p, "train", 4, 256, torch.float32, 0, ("transformers", "eager", "compile"))]
    return [ModelCase(ctx, backends, pr, kind, b, s, dt, n, pe) for pr, kind, b, s, dt, n, pe in grid
            if dtypes is None or dt in dtypes]


# ----------------------------------------------------------------------------------------------------------------------
# All cases
# ----------------------------------------------------------------------------------------------------------------------

SUITES = {"attention": attention_cases, "decode": decode_cases, "ffn": ffn_cases, "norm": norm_cases,
          "rope": rope_cases, "cross_entropy": cross_entropy_cases, "model": model_cases}
_OP_MODULE = {"attention": "attention", "decode": "decode", "ffn": "ffn", "norm": "norm", "rope": "rope",
              "cross_entropy": "cross_entropy", "model": None}


def cases(ops, ctx: Context, *, backends=None, dtypes=None) -> list:
    """The cases of ``ops`` for this context (device, suite, tiny). An op whose fastlm module does not import yet
    gives one "unavailable" case instead of its list."""
    out = []
    for op in ops:
        module = _OP_MODULE[op]
        reason = _module_available(module) if module else ""
        if reason:
            out.append(_missing(op, torch.float32, reason))
            continue
        out.extend(SUITES[op](ctx, backends, dtypes))
    return out
