"""Fused MLPs (GPT-2 GELU, Llama SwiGLU) against the float64 reference: output and the gradient of x, every weight and
bias and the residual by the numerics rule; odd hidden sizes and token counts; the C++ extension's forward wrapped with
a torch backward; empty and bad input."""
import importlib

import pytest
import torch

from conftest import DEVICE, DTYPES, backend_device, needs_cpu_kernel, needs_cuda_kernel
from fastlm import backends, reference
from fastlm.ops.ffn import mlp_gelu, mlp_swiglu
from fastlm.testing import check_op, check_rule

ffn = importlib.import_module("fastlm.ops.ffn")


def _gelu_inputs(M, d, inter, dtype, bias=True, residual=True, lead=(), device=DEVICE):
    def t(*shape, scale=1.0):
        return scale * torch.randn(*shape, dtype=dtype, device=device)
    return [t(*lead, M, d), t(inter, d, scale=d ** -0.5), t(inter) if bias else None,
            t(d, inter, scale=inter ** -0.5), t(d) if bias else None, t(*lead, M, d) if residual else None]


def _swiglu_inputs(M, d, inter, dtype, residual=True, device=DEVICE):
    def t(*shape, scale=1.0):
        return scale * torch.randn(*shape, dtype=dtype, device=device)
    return [t(M, d), t(inter, d, scale=d ** -0.5), t(inter, d, scale=d ** -0.5), t(d, inter, scale=inter ** -0.5),
            t(M, d) if residual else None]


MLPS = {"mlp_gelu": (mlp_gelu, reference.mlp_gelu, _gelu_inputs),
        "mlp_swiglu": (mlp_swiglu, reference.mlp_swiglu, _swiglu_inputs)}


def _rule_params():
    """Each MLP on Triton at DTYPES, the C++ CPU kernels at fp32/fp16/bf16, the CUDA kernels (tensor cores) at
    fp16/bf16."""
    out = []
    for name in MLPS:
        pairs = ([("triton", dt, []) for dt in DTYPES]
                 + [("cpu", dt, [needs_cpu_kernel(name)]) for dt in (torch.float32, torch.float16, torch.bfloat16)]
                 + [("cuda", dt, needs_cuda_kernel(name)) for dt in (torch.float16, torch.bfloat16)])
        out += [pytest.param(name, backend, dt, marks=marks, id=f"{name}-{backend}-{str(dt)[6:]}")
                for backend, dt, marks in pairs]
    return out


@pytest.mark.parametrize("name, backend, dtype", _rule_params())
# 1 row: CUDA's decode kernel; odd widths: a bf16 GEMM on pairs (AVX512-BF16) pads the last pair of d and of inter
@pytest.mark.parametrize("M, d, inter", [(1, 40, 160), (7, 96, 64), (129, 40, 96), (33, 37, 51)])
def test_mlp_rule(name, backend, dtype, M, d, inter):
    op, ref, make = MLPS[name]
    inputs = make(M, d, inter, dtype, device=backend_device(backend))
    fn = lambda *a: op(*a, backend=backend)  # noqa: E731
    check_op(f"{name}[{backend}]", fn, ref, inputs)
    with torch.no_grad():  # the inference path (the fused kernels of the C++ backends)
        check_op(f"{name}[{backend}, no_grad]", fn, ref, inputs, grads=False)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_cpu_kernel(n)) for n in MLPS])
def test_cpu_mlp_x_starting_mid_word(name):
    """bf16 x whose first element sits at an odd offset: the C++ GEMMs read x's rows as 32-bit words of pairs
    (AVX512-BF16), in place only where they are word-aligned."""
    op, ref, make = MLPS[name]
    inputs = make(33, 40, 96, torch.bfloat16, device="cpu")
    inputs[0] = torch.randn(1 + inputs[0].numel()).to(torch.bfloat16)[1:].view(inputs[0].shape)
    with torch.no_grad():
        check_op(f"{name}[cpu]", lambda *a: op(*a, backend="cpu"), ref, inputs, grads=False)


def _ops_run(fn):
    """The names of the operators fn() calls (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("engine", ["aten", "fastlm"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_cpu_kernel(n)) for n in MLPS])
# 300 x 8200: two token blocks (255 + a ragged 45) on either engine
@pytest.mark.parametrize("M, d, inter, residual", [(33, 37, 51, True), (129, 40, 96, False), (300, 24, 8200, True)])
def test_cpu_bf16_mlp_on_either_gemm(name, engine, M, d, inter, residual, monkeypatch):
    """bf16 MLPs above the decode sizes run their products on ATen's GEMM (oneDNN: AMX tiles where the CPU has them;
    FASTLM_CPU_BF16=aten, the default there) or on gemm.h's (fastlm): both by the numerics rule, on the engine
    asked for (the profiler sees ATen's products or none), also when called directly with inputs that require
    grad."""
    monkeypatch.setenv("FASTLM_CPU_BF16", engine)
    op, ref, make = MLPS[name]
    inputs = make(M, d, inter, torch.bfloat16, residual=residual, device="cpu")
    with torch.no_grad():
        check_op(f"{name}[cpu, {engine}]", lambda *a: op(*a, backend="cpu"), ref, inputs, grads=False)
        names = _ops_run(lambda: op(*inputs, backend="cpu"))
    assert f"fastlm::{name}" in names and ("aten::mm" in names) == (engine == "aten"), names
    # the op called directly with an input that requires grad (ATen's out= GEMMs refuse to record a graph)
    direct = getattr(torch.ops.fastlm, name)(inputs[0].clone().requires_grad_(), *inputs[1:])
    torch.testing.assert_close(direct, op(*inputs, backend="cpu"), rtol=0, atol=0)
    monkeypatch.setenv("FASTLM_CPU_BF16", "amx")     # an unknown value: an error on every bf16 call, decode sizes too
    for rows in (M, 4):
        small = [t[:rows] if t is not None and i in (0, len(inputs) - 1) else t for i, t in enumerate(inputs)]
        with pytest.raises(ValueError, match="FASTLM_CPU_BF16 must be auto, aten or fastlm, got 'amx'"):
            op(*small, backend="cpu")


def test_mlp_variants_without_bias_residual_and_with_leading_dims():
    check_op("mlp_gelu(no bias, no residual, (2, 7, d))", lambda *a: mlp_gelu(*a, backend="triton"),
             reference.mlp_gelu, _gelu_inputs(7, 40, 96, torch.float32, bias=False, residual=False, lead=(2,)))
    check_op("mlp_swiglu(no residual)", lambda *a: mlp_swiglu(*a, backend="triton"), reference.mlp_swiglu,
             _swiglu_inputs(7, 40, 96, torch.float32, residual=False))


def test_mlp_inference_and_expanded_grad():
    x, wg, wu, wd, r = _swiglu_inputs(7, 40, 96, torch.float32)
    with torch.no_grad():                                    # no pre-activations saved
        check_op("mlp_swiglu(no_grad)", lambda *a: mlp_swiglu(*a, backend="triton"), reference.mlp_swiglu,
                 [x, wg, wu, wd, r], grads=False)
    x.requires_grad_()
    mlp_swiglu(x, wg, wu, wd, r, backend="triton").sum().backward()   # stride-0 expanded gradient
    x64 = x.detach().double().requires_grad_()
    reference.mlp_swiglu(x64, wg.double(), wu.double(), wd.double(), r.double()).sum().backward()
    check_rule("mlp_swiglu dx (expanded grad)", x.grad, x64.grad, x64.grad.float())


def test_mlp_empty():
    x, w1, b1, w2, b2, r = _gelu_inputs(0, 40, 96, torch.float32)
    for t in (x, w1, b1, w2, b2, r):
        t.requires_grad_()
    y = mlp_gelu(x, w1, b1, w2, b2, r, backend="triton")
    assert y.shape == (0, 40)
    y.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1)) and torch.equal(b2.grad, torch.zeros_like(b2))


def test_mlp_zero_hidden_size():
    # hidden 0: the GEMMs have K == 0, the output is the epilogue of zero accumulators (bias, activation, residual)
    check_op("mlp_gelu(d=0)", lambda *a: mlp_gelu(*a, backend="triton"), reference.mlp_gelu,
             [torch.randn(3, 0, device=DEVICE), torch.randn(16, 0, device=DEVICE), torch.randn(16, device=DEVICE),
              torch.randn(8, 16, device=DEVICE), torch.randn(8, device=DEVICE), torch.randn(3, 8, device=DEVICE)])


@pytest.mark.skipif(DEVICE == "cpu" and not backends.extension_has("linear", "cpu"),
                    reason="the C++ extension (fastlm._C) with the CPU linear op is not built")
@pytest.mark.parametrize("fused_act_bwd", [True, False], ids=["fused_act_bwd", "torch_act_bwd"])
@pytest.mark.parametrize("name", ["mlp_gelu", "mlp_swiglu"])
def test_native_wrapper_backward(name, fused_act_bwd, monkeypatch):
    # the "cpu"/"cuda" backends' autograd wrapper: the three products run separately, the pre-activations are kept
    # (the second output) and the backward runs from them; the activation gradient falls back to torch math on a
    # device without the extension's kernel (as if so here with torch_act_bwd)
    if not fused_act_bwd:
        monkeypatch.setattr(ffn, "extension_has", lambda op, device: False)
    op = ffn._nat_gelu if name == "mlp_gelu" else ffn._nat_swiglu
    inputs = _gelu_inputs(7, 40, 96, torch.float32) if name == "mlp_gelu" else _swiglu_inputs(7, 40, 96, torch.float32)
    check_op(f"{name} native wrapper", lambda *a: op(*a)[0], getattr(reference, name), inputs)


@pytest.mark.parametrize("name", ["mlp_gelu", "mlp_swiglu"])
def test_triton_gradient_of_the_residual_alone(name):
    """Only the residual needs a gradient: the Triton forward keeps no pre-activation, and a backward asked for
    anyway (of the residual, dy itself) recomputes it."""
    fn, ref, make = MLPS[name]
    inputs = make(7, 40, 96, torch.float32)
    check_op(f"{name}(residual grad only)", lambda *a: fn(*a, backend="triton"), ref, inputs,
             constants=tuple(range(len(inputs) - 1)))


@pytest.mark.parametrize("call, exc, words", [
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1[:, :-1], b1, w2, b2), ValueError, "w_fc"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1, b1[:-1], w2, b2), ValueError, "b_fc"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1, b1, w2[:, :-1], b2), ValueError, "w_proj"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1, b1, w2, b2, x[:-1]), ValueError, "residual"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1.half(), b1, w2, b2), TypeError, "w_fc"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x.double(), w1.double(), None, w2.double(), None, backend="triton"),
     TypeError, "float64"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1, b1, w2, b2, backend="gpu"), ValueError, "backend"),
    (lambda x, w1, b1, w2, b2: mlp_swiglu(x, w1, w1[:-1], w2), ValueError, "w_up"),
    (lambda x, w1, b1, w2, b2: mlp_swiglu(x, w1, w1, w2.t()), ValueError, "w_down"),
    (lambda x, w1, b1, w2, b2: mlp_swiglu(x.long(), w1, w1, w2), TypeError, "x"),
    (lambda x, w1, b1, w2, b2: mlp_swiglu(x[0, 0], w1, w1, w2), ValueError, "0-dim"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x.tolist(), w1, b1, w2, b2), TypeError, "x must be a torch.Tensor"),
    (lambda x, w1, b1, w2, b2: mlp_swiglu(x, w1, w1.to("meta"), w2), ValueError, "w_up"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1[0], b1, w2, b2), ValueError, "w_fc must be a 2-D"),
    (lambda x, w1, b1, w2, b2: mlp_swiglu(x, w1, w1, None), ValueError, "w_down must be a 2-D .* got NoneType"),
    (lambda x, w1, b1, w2, b2: mlp_gelu(x, w1, b1.tolist(), w2, b2), TypeError, "b_fc must be a torch.Tensor"),
    (lambda x, w1, b1, w2, b2: mlp_swiglu(x, w1, w1, w2, 1.0), TypeError, "residual must be a torch.Tensor"),
])
def test_bad_input(call, exc, words):
    x, w1, b1, w2, b2, _ = _gelu_inputs(7, 40, 96, torch.float32)
    with pytest.raises(exc, match=words):
        call(x, w1, b1, w2, b2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.timeout(300)  # (autotuning: every candidate compiled and timed)
def test_mlps_large_autotuned(autotuning, dtype):
    # model-sized GEMMs through the autotuned configs (wgmma tiles), ragged M
    check_op("mlp_gelu(large)", lambda *a: mlp_gelu(*a, backend="triton"), reference.mlp_gelu,
             _gelu_inputs(1031, 768, 3072, dtype))
    check_op("mlp_swiglu(large)", lambda *a: mlp_swiglu(*a, backend="triton"), reference.mlp_swiglu,
             _swiglu_inputs(1031, 1024, 2816, dtype))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_training_epilogue_activates_the_stored_preactivation(kind, dtype):
    """In training the up GEMM's epilogue stores the rounded pre-activation for the backward and takes the
    activation of that rounded value (as unfused torch does), not of its fp32 accumulator: h is then the activation
    of the stored pre-activation(s), rounded once. (Taking it of the accumulator stays within the numerics rule at
    16 bits but disagrees with the stored values in about a third of the elements.)"""
    k = importlib.import_module("fastlm.kernels.ffn")
    x = torch.randn(64, 256, device=DEVICE, dtype=dtype)
    w1, w2 = (torch.randn(128, 256, device=DEVICE, dtype=dtype) / 16 for _ in range(2))
    if kind == "gelu":
        h, a, _ = k._gemm_launch(x, w1, None, torch.randn(128, device=DEVICE, dtype=dtype), None, k.ACT_GELU, True)
        want = torch.nn.functional.gelu(a.float(), approximate="tanh")
    else:
        h, g, u = k._gemm_launch(x, w1, w2, None, None, k.ACT_SWIGLU, True)
        want = torch.nn.functional.silu(g.float()) * u.float()
    # (the kernel's fp32 activation may round differently from torch's in the last bit, rarely)
    assert (h != want.to(dtype)).float().mean() < 1e-2


def _kept_gemm_configs():
    """(rows, kind, config) for every candidate tile the pruning keeps for a decode-sized (24: the 16- and 32-row
    tiles) or a prefill-sized (1031) number of rows, per MLP."""
    k = importlib.import_module("fastlm.kernels.ffn")
    x = torch.empty(0, dtype=torch.bfloat16)
    return [pytest.param(rows, kind, config, id=f"{rows}-{kind}-config{i}")
            for rows in (24, 1031) for kind, act in (("gelu", k.ACT_GELU), ("swiglu", k.ACT_SWIGLU))
            for i, config in enumerate(k.prune_configs(k.gpu_gemm_configs(),
                                                       {"M": rows, "N": 1408, "K": 512, "ACT": act, "X": x}))]


@pytest.mark.gpu
@pytest.mark.parametrize("rows, kind, config", _kept_gemm_configs())
def test_every_gemm_config(monkeypatch, rows, kind, config):
    """Autotuning may pick any candidate tile the pruning keeps: each one, forced, gives the MLP within the rule."""
    import triton

    k = importlib.import_module("fastlm.kernels.ffn")
    monkeypatch.setattr(k, "_gemm", triton.autotune([config], ["M_KEY", "N", "K", "ACT"])(k.ffn_gemm_kernel))
    op, ref, inputs = ((mlp_gelu, reference.mlp_gelu, _gelu_inputs) if kind == "gelu" else
                       (mlp_swiglu, reference.mlp_swiglu, _swiglu_inputs))
    check_op(f"{op.__name__}({config})", lambda *a: op(*a, backend="triton"), ref,
             inputs(rows, 512, 1408, torch.bfloat16))


def test_gemm_config_pruning(monkeypatch):
    k = importlib.import_module("fastlm.kernels.ffn")
    x = torch.empty(0, dtype=torch.bfloat16)
    configs = k.gpu_gemm_configs()
    limit = 232448                                                 # an H200 (the CPU tensor stands for it)

    def kept(M, N, K, act):
        out = k.prune_configs(configs, {"M": M, "N": N, "K": K, "ACT": act, "X": x})
        assert out, "pruning must leave a config"
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in out]

    assert all(bm == 16 for bm, *_ in kept(1, 4096, 4096, k.ACT_NONE))                  # decoding: thin tiles
    for bm, bn, bk, warps, stages in kept(8192, 14336, 4096, k.ACT_SWIGLU):
        assert bm >= 64 and 2 * bm * bn <= 128 * 32 * warps                              # registers of 2 accumulators
        assert stages * (bm * bk + 2 * bn * bk) * 2 <= limit - k.SMEM_RESERVE
    assert all(bn <= 64 and bk <= 64 for _, bn, bk, *_ in kept(7, 40, 40, k.ACT_GELU))
    assert kept(4096, 14336, 4096, k.ACT_SWIGLU)[0] == (128, 128, 64, 8, 4)           # 196608 bytes on sm_90 (ptxas)
    # the device's shared memory, not the H200's: an sm_89 GPU (L4, L40S, RTX 4090) has 99 KB a block and pipelines
    # num_stages - 1 tiles (cp.async); that tile needs 147456 bytes there (ptxas), more than it has
    monkeypatch.setattr(k, "shared_memory", lambda device: (101376, 8))
    limit = 101376
    for M, act in ((4096, k.ACT_SWIGLU), (4096, k.ACT_GELU), (1, k.ACT_NONE)):
        out = kept(M, 14336, 4096, act)
        assert (128, 128, 64, 8, 4) not in out
        assert all((stages - 1) * (bm * bk + (2 if act == k.ACT_SWIGLU else 1) * bn * bk) * 2
                   <= limit - k.SMEM_RESERVE for bm, bn, bk, _, stages in out)
