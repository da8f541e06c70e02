"""The CUDA C++ kernels of fastlm._C (csrc/cuda/), called through torch.ops.fastlm on CUDA tensors, against the
float64 reference (numerics rule); plus what runs anywhere: the tensor-core layout emulation of
bench/dev/mma_layout_emu.py and the ptxas-report parser of csrc/cuda/compile_check.py."""
import concurrent.futures
import glob
import importlib.util
import math
import os
import shutil
import subprocess

import pytest
import torch

from conftest import cuda_kernel_test
from fastlm import backends, reference
from fastlm.testing import check_rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float16, torch.bfloat16]
KERNELS = ["mma", "wgmma"]  # FASTLM_CUDA_KERNELS families


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).cuda()


# ---------------------------------------------------------------- attention_fwd

ATTN_CASES = [  # (D, Sq, Sk, H, Hkv, causal, window)
    (32, 1, 1, 2, 2, False, (-1, -1)),
    (64, 7, 65, 4, 2, True, (-1, -1)),
    (64, 129, 129, 4, 1, True, (-1, -1)),
    (96, 65, 130, 3, 3, False, (16, 8)),
    (128, 200, 77, 4, 2, True, (-1, -1)),   # Sk < Sq causal: the first rows see no key (out 0, lse -inf)
    (128, 130, 130, 2, 2, False, (32, 0)),
    (256, 70, 33, 2, 1, False, (-1, -1)),
    # several 128-row query blocks and 128-key tiles, ragged at both ends (the wgmma kernel's tiles)
    (64, 257, 700, 2, 2, False, (100, 37)),
    (128, 300, 520, 4, 1, True, (-1, -1)),
    (128, 1, 1000, 2, 1, True, (-1, -1)),
    (64, 1024, 1024, 2, 2, True, (-1, -1)),
    (64, 300, 20, 2, 2, True, (-1, -1)),    # whole 128-row blocks see no key (the wgmma kernel loads nothing there)
    # head dims the wgmma kernel pads to whole 64-column slabs (32, 96), and 256 with its 64-key tiles, over several
    # query blocks and key tiles (both ring slots reused), ragged at both ends
    (32, 260, 300, 2, 1, True, (-1, -1)),
    (96, 257, 390, 4, 2, False, (-1, -1)),
    (256, 300, 450, 4, 2, True, (-1, -1)),
    (256, 129, 200, 2, 2, False, (70, 20)),
    # windows wider than a query block and a key tile: tiles inside the window are fully visible
    (64, 700, 700, 2, 1, True, (300, -1)),
    (128, 500, 600, 2, 2, False, (260, 200)),
]


def _attention_params():
    """Every case with each tensor-core kernel family."""
    return [pytest.param(kernel, *case, id=f"{kernel}-" + "-".join(map(str, case)))
            for case in ATTN_CASES for kernel in KERNELS]


@pytest.fixture
def cuda_kernels(monkeypatch):
    """Select the tensor-core kernels through FASTLM_CUDA_KERNELS; the wgmma ones need a compute capability 9.x GPU."""
    def select(kernels):
        if kernels == "wgmma" and torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the wgmma kernels need a Hopper (sm_90) GPU")
        monkeypatch.setenv("FASTLM_CUDA_KERNELS", kernels)
    return select


@cuda_kernel_test("attention_fwd")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel,D,Sq,Sk,H,Hkv,causal,window", _attention_params())
def test_attention_fwd(cuda_kernels, kernel, dtype, D, Sq, Sk, H, Hkv, causal, window):
    cuda_kernels(kernel)
    q, k, v = _randn(2, Sq, H, D, dtype=dtype), _randn(2, Sk, Hkv, D, dtype=dtype), _randn(2, Sk, Hkv, D, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    _check_attention(q, k, v, causal, scale, window)


def _check_attention(q, k, v, causal, scale, window=(-1, -1)):
    """torch.ops.fastlm.attention_fwd on CUDA: out and lse against the reference, by the numerics rule."""
    out, lse = torch.ops.fastlm.attention_fwd(q, k, v, causal, scale, window[0], 0 if causal else window[1])
    kw = dict(causal=causal, softmax_scale=scale, window=window, return_lse=True)
    ref64, lse64 = reference.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **kw)
    ref_low = reference.attention(q, k, v, **kw)[0]
    lse_low = reference.attention(q.float(), k.float(), v.float(), **kw)[1]  # the fp32 LSE: fp32 math
    check_rule("out", out, ref64, ref_low.cpu())
    check_rule("lse", lse, lse64, lse_low.cpu())


@cuda_kernel_test("attention_fwd")
@pytest.mark.parametrize("kernel,D", [("mma", 64), ("wgmma", 64), ("wgmma", 96), ("wgmma", 128), ("wgmma", 256)])
def test_attention_fwd_large_logits_and_strided(cuda_kernels, kernel, D):
    # q.k ~ 30 exercises the running-max rescaling; a transposed view exercises the stride handling
    cuda_kernels(kernel)
    q = _randn(1, 2, 300, D, dtype=torch.bfloat16, scale=4.0).transpose(1, 2)  # (1, 300, 2, D), strided
    k, v = _randn(1, 300, 2, D, dtype=torch.bfloat16), _randn(1, 300, 2, D, dtype=torch.bfloat16)
    _check_attention(q, k, v, True, 0.125)


@cuda_kernel_test("attention_fwd")
@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_fwd_expanded_kv_heads(cuda_kernels, kernel):
    # one K / V head expanded over 4 (stride 0 with size 4: the wgmma kernel's tensor maps see a zero stride). Where
    # the driver refuses such a tensor map, auto runs the mma.sync kernel and a forced wgmma refuses by name.
    q = _randn(2, 200, 8, 128, dtype=torch.bfloat16)
    k, v = (_randn(2, 200, 1, 128, dtype=torch.bfloat16).expand(2, 200, 4, 128) for _ in "kv")
    cuda_kernels("auto")
    _check_attention(q, k, v, True, 0.088)
    cuda_kernels(kernel)
    try:
        _check_attention(q, k, v, True, 0.088)
    except RuntimeError as e:
        assert kernel == "wgmma" and "tensor map of k" in str(e), e


@cuda_kernel_test("attention_fwd")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("Sq,Sk", [(70, 300), (300, 70)])
def test_attention_fwd_window_past_every_key(cuda_kernels, kernel, Sq, Sk):
    # windows past every key (the binding clamps them into int range) are no window, bit for bit
    cuda_kernels(kernel)
    q, k, v = _randn(1, Sq, 2, 64, dtype=torch.float16), *(_randn(1, Sk, 2, 64, dtype=torch.float16) for _ in "kv")
    far = 1 << 40
    for causal, window in ((False, (far, far)), (True, (far, 0))):
        wide = torch.ops.fastlm.attention_fwd(q, k, v, causal, 0.125, *window)
        none = torch.ops.fastlm.attention_fwd(q, k, v, causal, 0.125, -1, 0 if causal else -1)
        assert all(torch.equal(a, b) for a, b in zip(wide, none)), (causal, window)


@cuda_kernel_test("attention_fwd")
def test_attention_fwd_unsupported_raises():
    q = _randn(1, 4, 2, 64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.fastlm.attention_fwd(q, q, q, False, 0.125, -1, -1)
    # refused before anything is copied or allocated: 36's rows are not 16-byte aligned (a decode cache would be
    # cloned whole first), 0 has no lse to fill
    lens = torch.zeros(1, dtype=torch.int32, device="cuda")
    for d in (40, 36, 0):
        q = _randn(1, 4, 2, d, dtype=torch.float16)
        with pytest.raises(RuntimeError, match=f"head dim must be one of 32, 64, 96, 128, 256 .*got {d}"):
            torch.ops.fastlm.attention_fwd(q, q, q, False, 0.125, -1, -1)
        with pytest.raises(RuntimeError, match=f"head dim must be one of 32, 64, 96, 128, 256 .*got {d}"):
            torch.ops.fastlm.decode_attention(q[:, :1], q, q, lens, 0.125, -1)


@cuda_kernel_test("attention_fwd")
def test_kernel_family_choice_errors(monkeypatch):
    q = _randn(1, 4, 2, 32, dtype=torch.float16)
    monkeypatch.setenv("FASTLM_CUDA_KERNELS", "fastest")
    with pytest.raises(RuntimeError, match="FASTLM_CUDA_KERNELS must be 'auto', 'mma' or 'wgmma', got 'fastest'"):
        torch.ops.fastlm.attention_fwd(q, q, q, False, 0.125, -1, -1)
    x, w = _randn(3, 64, dtype=torch.float16), _randn(24, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="FASTLM_CUDA_KERNELS must be"):
        torch.ops.fastlm.mlp_swiglu(x, w, w, w.t().contiguous(), None)
    monkeypatch.setenv("FASTLM_CUDA_KERNELS", "wgmma")  # off Hopper, the device is refused
    if torch.cuda.get_device_capability()[0] != 9:
        with pytest.raises(RuntimeError, match="attention_fwd: FASTLM_CUDA_KERNELS=wgmma, but "):
            torch.ops.fastlm.attention_fwd(q, q, q, False, 0.125, -1, -1)
        x = _randn(9, 64, dtype=torch.float16)  # the MLP's tensor-core GEMMs (9 rows and more)
        with pytest.raises(RuntimeError, match="mlp_swiglu: FASTLM_CUDA_KERNELS=wgmma, but "):
            torch.ops.fastlm.mlp_swiglu(x, w, w, w.t().contiguous(), None)


@cuda_kernel_test("mlp_swiglu")
def test_auto_runs_the_wgmma_kernels_on_hopper(monkeypatch):
    """FASTLM_CUDA_KERNELS unset ("auto") on a 9.x GPU with an sm_90a build: attention (head dim 128) and the MLP give
    bit for bit what the forced wgmma kernels give."""
    if torch.cuda.get_device_capability()[0] != 9 or not getattr(backends.extension(), "with_sm90a", False):
        pytest.skip("needs a Hopper (sm_90) GPU and an extension built for sm_90a")
    q, k, v = (_randn(1, 300, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    x, w = _randn(70, 128, dtype=torch.bfloat16), _randn(200, 128, dtype=torch.bfloat16, scale=0.1)
    results = {}
    for kernels in ("auto", "wgmma"):
        monkeypatch.setenv("FASTLM_CUDA_KERNELS", kernels)
        results[kernels] = (*torch.ops.fastlm.attention_fwd(q, k, v, True, 0.1, -1, 0),
                            torch.ops.fastlm.mlp_swiglu(x, w, w, w.t().contiguous(), None))
    for auto, wgmma in zip(results["auto"], results["wgmma"]):
        assert torch.equal(auto, wgmma)


# ---------------------------------------------------------------- fused MLPs

# (leading dims, d_model, d_ff): ragged row / column blocks, K a partial last k tile (200, 688, 96), K below one
# 64-wide k tile (48), K past the wgmma GEMM's 4 ring slots (320: the first slot reused on the last tile; 512,
# 1376), whole 128-row blocks and N = 8 (256 rows, d_ff 8); at most 8 rows take the gemv kernel (1, 5, 8 rows; K
# past its 1024 elements per step), 9 rows the tensor-core GEMMs
MLP_SHAPES = [((2, 37), 64, 200), ((3, 130), 256, 688), ((5,), 96, 48), ((2, 150), 512, 1376), ((1,), 512, 1376),
              ((2, 4), 264, 96), ((9,), 64, 200), ((3, 7), 96, 48), ((256,), 320, 8)]


@cuda_kernel_test("mlp_gelu")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,f", MLP_SHAPES)
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False)])
def test_mlp_gelu(cuda_kernels, kernel, dtype, lead, d, f, bias, residual):
    cuda_kernels(kernel)
    x = _randn(*lead, d, dtype=dtype)
    w_fc, w_proj = _randn(f, d, dtype=dtype, scale=d ** -0.5), _randn(d, f, dtype=dtype, scale=f ** -0.5)
    b_fc = _randn(f, dtype=dtype) if bias else None
    b_proj = _randn(d, dtype=dtype) if bias else None
    res = _randn(*lead, d, dtype=dtype) if residual else None
    _check_mlp("mlp_gelu", x, w_fc, b_fc, w_proj, b_proj, res)


def _check_mlp(name, *args):
    """torch.ops.fastlm.<name>(*args) on CUDA against the reference, by the numerics rule."""
    out = getattr(torch.ops.fastlm, name)(*args)
    ref64 = getattr(reference, name)(*[a.cpu().double() if a is not None else None for a in args])
    ref_low = getattr(reference, name)(*args)
    assert torch.isfinite(out).all()
    check_rule(name, out, ref64, ref_low.cpu())


@cuda_kernel_test("mlp_swiglu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,f", MLP_SHAPES)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("kernel", KERNELS)
def test_mlp_swiglu(cuda_kernels, kernel, dtype, lead, d, f, residual):
    cuda_kernels(kernel)
    x = _randn(*lead, d, dtype=dtype)
    w_gate, w_up = _randn(f, d, dtype=dtype, scale=d ** -0.5), _randn(f, d, dtype=dtype, scale=d ** -0.5)
    w_down = _randn(d, f, dtype=dtype, scale=f ** -0.5)
    res = _randn(*lead, d, dtype=dtype) if residual else None
    _check_mlp("mlp_swiglu", x, w_gate, w_up, w_down, res)


@cuda_kernel_test("mlp_swiglu")
def test_mlp_no_rows():
    x, w = _randn(0, 64, dtype=torch.float16), _randn(24, 64, dtype=torch.float16)
    assert torch.ops.fastlm.mlp_swiglu(x, w, w, w.t().contiguous(), None).shape == (0, 64)
    assert torch.ops.fastlm.mlp_gelu(x, w, None, w.t().contiguous(), None, None).shape == (0, 64)


@cuda_kernel_test("mlp_swiglu")
def test_mlp_unsupported_raises():
    x, w = _randn(3, 60, dtype=torch.float16), _randn(24, 60, dtype=torch.float16)  # d_model 60: not a multiple of 8
    with pytest.raises(RuntimeError, match="multiples of 8"):
        torch.ops.fastlm.mlp_swiglu(x, w, w, w.t().contiguous(), None)
    x, w = _randn(3, 64, dtype=torch.float32), _randn(24, 64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.fastlm.mlp_swiglu(x, w, w, w.t().contiguous(), None)


# ---------------------------------------------------------------- compile_check's ptxas parser (no GPU needed)

PTXAS_SAMPLE = """\
ptxas info    : Compiling entry function '_Z6kernelILi64EEvv' for 'sm_90a'
ptxas info    : Function properties for _Z6kernelILi64EEvv
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90a'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : (C7517) warpgroup.wait is injected in around line 812 to allow use of registers defined by GMMA
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to ...
ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at entry.
ptxas info    : (C7999) an advisory about something else
"""


# the two warp-specialized kernels at the register count their setmaxnreg split needs at entry (168)
WARP_SPECIALIZED_SAMPLE = """\
ptxas info    : Compiling entry function '_Z26attention_fwd_wgmma_kernelv' for 'sm_90a'
ptxas info    : Function properties for _Z26attention_fwd_wgmma_kernelv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z20gemm_tn_wgmma_kernelv' for 'sm_90a'
ptxas info    : Function properties for _Z20gemm_tn_wgmma_kernelv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]
"""


def _load(*path):
    spec = importlib.util.spec_from_file_location(path[-1][:-3], os.path.join(ROOT, *path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tensor_core_layout_emulation():
    """bench/dev/mma_layout_emu.py: the kernels' ldmatrix / mma.sync and wgmma descriptor / swizzle arithmetic,
    emulated in numpy as the PTX ISA defines it, equals plain matrix products (runs without a GPU). Its address
    formulas are the kernels' own: test_tensor_core_layout_is_the_kernels."""
    _load("bench", "dev", "mma_layout_emu.py").main()


# the formulas of tests/cuda_layout_test.cu's lines, each a function of the same name in the emulator; and its constants
LAYOUT_FORMULAS = ("sm90_tile", "slab", "k_step", "mn_step", "mn_lbo", "tile_map", "ldsm_a", "ldsm_b", "ldsm_b_trans",
                   "gemm_stage_rows", "gemm_weight_row", "gemm_a_row", "gemm_b_row", "gemm_row", "gemm_col",
                   "wg_gemm_b_tile", "wg_gemm_a_row", "wg_gemm_row", "wg_gemm_col", "gemv_col", "gemv_k")
LAYOUT_NAMES = set(LAYOUT_FORMULAS) | {"desc", "k_major_lbo", "gemv_shape", "gemm_shape", "wg_gemm_shape"}


def layout_mismatches(lines, emu):
    """The lines of tests/cuda_layout_test.cu's output ("name args... = value") whose value differs from the
    emulator's formula of that name, and lines naming no formula."""
    constants = {"k_major_lbo": emu.K_MAJOR_LBO, "gemv_shape": emu.GEMV_SHAPE, "gemm_shape": emu.GEMM_SHAPE,
                 "wg_gemm_shape": emu.WG_GEMM_SHAPE}
    formulas = {name: getattr(emu, name) for name in LAYOUT_FORMULAS}
    formulas.update({name: (lambda value=value: value) for name, value in constants.items()}, desc=emu.sw128_desc)
    bad = []
    for line in lines:
        lhs, rhs = line.split(" = ")
        name, *args = lhs.split()
        value = tuple(map(int, rhs.split()))
        if name not in formulas:
            bad.append(f"{line} (no such formula)")
            continue
        expected = formulas[name](*map(int, args))
        if (expected if isinstance(expected, tuple) else (expected,)) != value:
            bad.append(f"{line} (emulator: {expected})")
    return bad


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_tensor_core_layout_is_the_kernels(tmp_path):
    """The layout arithmetic the emulation checks is the kernels' own: mma.cuh's ldmatrix rows, wgmma.cuh's
    descriptors and sw128 tile offsets, attention_tile.cuh's Sm90Shape, tma.cuh's tensor-map geometry and
    ffn_layout.cuh's GEMM and GEMV mappings, printed by tests/cuda_layout_test.cu (built with nvcc, host code only),
    equal the emulator's formulas at every printed point. A mismatch is caught (a tampered line)."""
    exe = str(tmp_path / "layout_test")
    build = subprocess.run(["nvcc", "-std=c++17", "--expt-relaxed-constexpr", "-I", os.path.join(ROOT, "csrc"),
                            "-Werror", "all-warnings", "-o", exe, os.path.join(ROOT, "tests", "cuda_layout_test.cu")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    names = {line.split()[0] for line in lines}
    assert names == LAYOUT_NAMES, names
    assert {int(line.split()[1]) for line in lines if line.startswith("sm90_tile")} >= set(backends.CUDA_HEAD_DIMS)
    emu = _load("bench", "dev", "mma_layout_emu.py")
    assert layout_mismatches(lines, emu) == []
    for name in ("k_step 5 128 64 ", "ldsm_b_trans 17 16 0 40 ", "gemv_k 1024 2 17 ", "tile_map 64 5 1 3 ",
                 "gemm_col 5 1 6 64 ", "wg_gemm_row 1 2 31 1 "):
        tampered = [line.replace("= ", "= 1", 1) if line.startswith(name) else line for line in lines]
        assert len(layout_mismatches(tampered, emu)) == 1, name


@pytest.mark.parametrize("mutant", ["no swizzle", "sbo 512", "lbo unused"])
def test_tensor_core_layout_emulation_catches_layout_mistakes(mutant, monkeypatch):
    """The wgmma checks fail on plausible layout mistakes: operands stored without the XOR swizzle (TMA boxes as a
    SWIZZLE_NONE tensor map writes them), a wrong SBO, V's column-slab stride (LBO) left out of its MN-major
    descriptor."""
    emu = _load("bench", "dev", "mma_layout_emu.py")
    if mutant == "no swizzle":
        real_box = emu.tma_load_box
        monkeypatch.setattr(emu, "tma_load_box", lambda *args: real_box(*args, swizzle=lambda addr: addr))
    else:
        real = emu.sw128_desc
        sbo_512 = (1024 >> 4 << 32) ^ (512 >> 4 << 32)
        monkeypatch.setattr(emu, "sw128_desc", (lambda addr, lbo: real(addr, lbo) ^ sbo_512) if mutant == "sbo 512"
                            else (lambda addr, lbo: real(addr, 16)))
    for D in (96, 128, 256):                        # (32: one 64-column slab, where LBO plays no part either)
        with pytest.raises(AssertionError):
            emu.check_attention_wgmma(D)
    if mutant != "lbo unused":                      # the GEMM's operands are K-major: LBO plays no part there
        with pytest.raises(AssertionError):
            emu.check_gemm_wgmma(64)


@pytest.mark.parametrize("mutant", ["gemm b rows", "gemm store columns", "wgmma gemm store rows", "map head stride"])
def test_tensor_core_mapping_emulation_catches_mapping_mistakes(mutant, monkeypatch):
    """The GEMM and TMA checks fail on plausible mapping mistakes: the warps' weight rows at a wrong column offset,
    one warp storing to the wrong columns, a consumer warpgroup storing to the wrong rows, a tensor map that packs the
    heads onto the rows whatever the head stride."""
    emu = _load("bench", "dev", "mma_layout_emu.py")
    if mutant == "gemm b rows":
        monkeypatch.setattr(emu, "gemm_b_row", lambda warp, w, bn: emu.gemm_weight_row(w, bn) + (warp & 3) * bn // 8)
        check = lambda: emu.check_gemm(128, 1)
    elif mutant == "gemm store columns":
        real = emu.gemm_col
        monkeypatch.setattr(emu, "gemm_col", lambda warp, j, lane, bn: real(warp, j, lane, bn) ^ (8 * (warp == 5)))
        check = lambda: emu.check_gemm(64, 2)
    elif mutant == "wgmma gemm store rows":
        monkeypatch.setattr(emu, "wg_gemm_row", lambda cw, warp, lane, hh: 32 * cw + 16 * warp + lane // 4 + 8 * hh)
        check = lambda: emu.check_gemm_wgmma(64)
    else:
        real = emu.tile_map
        monkeypatch.setattr(emu, "tile_map", lambda *spec: real(*spec[:5], spec[1] * spec[4], *spec[6:]))
        check = lambda: emu.check_attention_wgmma(128)
    with pytest.raises(AssertionError):
        check()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_launchers_host_side(tmp_path):
    """tests/cuda_launchers_test.cu against csrc/cuda's launchers, built with nvcc (PTX only: nothing is launched on
    a GPU) and run here: argument errors name the problem, empty problems succeed without the device, decode's split
    heuristic gives its figures, without a usable GPU a valid launch fails cleanly, and the kernels' head dims are
    fastlm.backends.CUDA_HEAD_DIMS."""
    sources = [os.path.join(ROOT, "tests", "cuda_launchers_test.cu")] + sorted(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    flags = ["-gencode=arch=compute_80,code=compute_80", "-std=c++17", "-O1", "--expt-relaxed-constexpr",
             "-DFASTLM_CUDA_SM90A", "-I", os.path.join(ROOT, "csrc"), "-Werror", "all-warnings"]

    def compile_one(src):
        obj = str(tmp_path / (os.path.basename(src) + ".o"))
        proc = subprocess.run(["nvcc", "-c", src, "-o", obj, *flags], capture_output=True, text=True)
        assert proc.returncode == 0, f"{src}:\n{proc.stdout}{proc.stderr}"
        return obj

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        objects = list(pool.map(compile_one, sources))
    exe = str(tmp_path / "launchers_test")
    link = subprocess.run(["nvcc", "-o", exe, *objects], capture_output=True, text=True)
    assert link.returncode == 0, link.stdout + link.stderr
    run = subprocess.run([exe, *map(str, backends.CUDA_HEAD_DIMS)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok: 0 failed" in run.stdout, run.stdout + run.stderr


def test_compile_check_parses_ptxas():
    mod = _load("csrc", "cuda", "compile_check.py")
    rows = mod.parse_ptxas(PTXAS_SAMPLE)
    assert rows == [
        {"kernel": "_Z6kernelILi64EEvv", "arch": "sm_90a", "regs": 255, "spill_st": 8, "spill_ld": 12, "stack": 24,
         "smem": 4096},
        {"kernel": "_Z5otherv", "arch": "sm_90a", "regs": 40, "spill_st": 0, "spill_ld": 0, "stack": 0, "smem": 0},
    ]
    assert [a[:7] for a in mod.wgmma_advisories(PTXAS_SAMPLE)] == ["(C7517)", "(C7515)", "(C7508)"]


@pytest.mark.parametrize("advisory", [None, "wgmma", "spill", "registers", "renamed", "static smem"])
def test_compile_check_fails_on_advisories_and_spills(advisory, monkeypatch, capsys):
    """--check exits 1 when ptxas reports a wgmma advisory or a spill, when a warp-specialized kernel gets fewer
    registers at entry than its setmaxnreg split needs (a hang on the GPU), is no longer in the report or has static
    shared memory (which would shift its 1024-byte aligned swizzled tiles), 0 for a clean report (nvcc stubbed
    out)."""
    mod = _load("csrc", "cuda", "compile_check.py")
    assert mod.entry_registers_needed() == 168  # (128 x 24 + 256 x 240) / 384 for tma.cuh's split
    clean = PTXAS_SAMPLE.split("ptxas info    : (C75")[0].replace("8 bytes spill stores, 12 bytes spill loads",
                                                                    "0 bytes spill stores, 0 bytes spill loads")
    clean += WARP_SPECIALIZED_SAMPLE
    out = {None: clean, "wgmma": PTXAS_SAMPLE.replace("8 bytes spill stores, 12 bytes spill loads",
                                                      "0 bytes spill stores, 0 bytes spill loads") +
           WARP_SPECIALIZED_SAMPLE,
           "spill": clean.replace("0 bytes stack frame, 0 bytes spill stores", "0 bytes stack frame, 4 bytes spill "
                                  "stores", 1),
           "registers": clean.replace("Used 168 registers", "Used 160 registers", 1),
           "renamed": clean.replace("gemm_tn_wgmma_kernel", "gemm_wgmma_tn_kernel"),
           "static smem": clean.replace("Used 168 registers, used 1 barriers,", "Used 168 registers, used 1 "
                                        "barriers, 16 bytes smem,", 1)}[advisory]
    monkeypatch.setattr(mod.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(mod, "compile_one", lambda nvcc, src, arch, gencode, tmp: (src, arch, 0, out, 0.1))
    assert mod.main(["--check"]) == (0 if advisory is None else 1)
    report = capsys.readouterr().out
    assert ("WGMMA: " in report) == (advisory == "wgmma") and ("SPILLS: " in report) == (advisory == "spill")
    assert ("REGISTERS: " in report) == (advisory in ("registers", "renamed")), report
    assert ("STATIC SMEM: " in report) == (advisory == "static smem"), report
