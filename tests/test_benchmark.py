"""The benchmark harness itself: work counts, the wrong-result flag, the JSON, the CLI, the README generator."""
import dataclasses
import functools
import importlib.util
import os
import subprocess

import pytest
import torch

from fastlm import backends, benchmark, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- work counts against hand-computed values ----------------------------------------------------------------------

def test_attention_flops_by_hand():
    # 4 * B * H * Sq * Sk * D = 4 * 2 * 4 * 128 * 128 * 64
    assert benchmark.attention_flops(2, 4, 128, 128, 64) == 33_554_432
    assert benchmark.attention_flops(2, 4, 128, 128, 64, causal=True) == 16_777_216            # halved
    assert benchmark.attention_flops(2, 4, 128, 128, 64, mode="bwd") == 2.5 * 33_554_432
    assert benchmark.attention_flops(2, 4, 128, 128, 64, causal=True, mode="fwd_bwd") == 3.5 * 16_777_216
    # Sq != Sk causal counts the unmasked pairs: Sq=3, Sk=5 -> query i sees i + 3 keys: 3 + 4 + 5 = 12 pairs
    assert benchmark.causal_pairs(3, 5) == 12
    assert benchmark.attention_flops(1, 1, 3, 5, 2, causal=True) == 4 * 12 * 2
    # Sq=5, Sk=3: the first two queries see no key, then 1 + 2 + 3
    assert benchmark.causal_pairs(5, 3) == 6


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 9), (7, 7), (9, 4), (4, 9), (65, 129)])
def test_causal_pairs_match_the_reference_mask(sq, sk):
    assert benchmark.causal_pairs(sq, sk) == int(reference.attention_mask(sq, sk, causal=True).sum())


def test_gemm_mlp_and_byte_counts_by_hand():
    assert benchmark.gemm_flops(3, 5, 7) == 210
    assert benchmark.mlp_flops(10, 4, 6, "swiglu") == 3 * 2 * 10 * 6 * 4 == 1440
    assert benchmark.mlp_flops(10, 4, 6, "gelu") == 960
    assert benchmark.mlp_flops(10, 4, 6, "gelu", mode="bwd") == 1920
    assert benchmark.elementwise_bytes(10, 5, 4) == 60
    # weights (3 d f for SwiGLU; 2 d f + f + d with GELU's biases) once, x / residual / out of T tokens; bf16
    assert benchmark.mlp_bytes(2, 4, 6, "swiglu", 2) == (3 * 4 * 6 + 3 * 2 * 4) * 2 == 192
    assert benchmark.mlp_bytes(2, 4, 6, "gelu", 2) == (2 * 4 * 6 + 6 + 4 + 3 * 2 * 4) * 2 == 164
    # K and V: 2 * B * ctx * Hkv * D elements; q and out: 2 * B * 1 * H * D; bf16 = 2 bytes
    assert benchmark.decode_bytes(2, 100, 8, 2, 64, 2) == (2 * 2 * 100 * 2 * 64 + 2 * 2 * 1 * 8 * 64) * 2 == 106_496


# -- a wrong kernel is flagged -------------------------------------------------------------------------------------

def _rms_case(impls):
    def make(gen, device):
        return {"x": torch.randn(64, 96, generator=gen, device=device),
                "weight": torch.randn(96, generator=gen, device=device)}
    return benchmark.OpCase(op="norm", name="rms_norm T64 d96", shape={"tokens": 64, "d_model": 96},
                            dtype=torch.float32, mode="fwd", make_inputs=make, reference=reference.rms_norm,
                            impls=impls, bytes=benchmark.elementwise_bytes(2 * 64 * 96 + 96, 0, 4))


def _off_by_a_little(x, weight):
    return reference.rms_norm(x, weight) * (1 + 1e-4)          # a plausible-looking but wrong kernel


def test_wrong_result_is_flagged_in_results_and_table():
    """A wrong answer is timed and flagged, but gets no rate or speed-up, and no speed-up is measured against it."""
    case = _rms_case([benchmark.Impl("fastlm[bad]", "fastlm", _off_by_a_little),
                      benchmark.Impl("fastlm[good]", "fastlm", reference.rms_norm),
                      benchmark.Impl("eager", "peer", reference.rms_norm),
                      benchmark.Impl("bad-peer", "peer", _off_by_a_little)])
    ctx = benchmark.Context(device=torch.device("cpu"), timing=benchmark.TINY)
    results = {r.impl: r for r in benchmark.run([case], ctx, progress=False)}
    benchmark.add_speedups(list(results.values()))
    bad, good = results["fastlm[bad]"], results["fastlm[good]"]
    assert bad.status == "wrong" and bad.correct is False and bad.max_err > 1e-5
    assert good.status == "ok" and good.correct is True and good.max_err <= 2 * good.ref_err + 1e-6
    assert results["bad-peer"].correct is False
    assert bad.median_s > 0 and bad.speedup == {} and set(good.speedup) == {"eager"}
    lines = benchmark.table([r.__dict__ for r in results.values()]).splitlines()
    bad_line = next(line for line in lines if "fastlm[bad]" in line)
    assert "WRONG" in bad_line and "B/s" not in bad_line and "x " not in bad_line
    assert not any("fastlm[good]" in line and "WRONG" in line for line in lines)
    summary = benchmark.summary_rows([r.__dict__ for r in results.values()])
    rows = {r["impl"]: r for r in summary}
    assert rows["fastlm[bad]"]["ratio"] is None and rows["fastlm[bad]"]["rate"] == "wrong"
    assert rows["fastlm[bad]"]["pct_ceiling"] is None
    assert "WRONG" in rows["fastlm[bad]"]["max_err"] and rows["fastlm[good]"]["best_peer"] == "eager"


def test_failing_and_unavailable_implementations_become_rows():
    def raises(x, weight):
        raise ValueError("boom")

    def unavailable(x, weight):
        raise benchmark.Unavailable("not built here")

    fallback = benchmark.Impl("fastlm[torch]", "fastlm", reference.rms_norm, backend="torch")
    case = _rms_case([benchmark.Impl("fastlm[err]", "fastlm", raises),
                      benchmark.Impl("fastlm[cpu]", "fastlm", unavailable, backend="cpu", fallback=fallback)])
    ctx = benchmark.Context(device=torch.device("cpu"), timing=benchmark.TINY)
    err, fell_back = benchmark.run([case], ctx, progress=False)
    assert err.status == "error" and "boom" in err.message and err.median_s is None
    assert fell_back.impl == "fastlm[torch]" and fell_back.status == "ok" and "not built here" in fell_back.message
    text = benchmark.table([err.__dict__, fell_back.__dict__])
    assert "ERROR" in text and "boom" in text


def test_cpu_timing_rotates_the_implementations_in_shuffled_rounds_and_survives_one_failing_midway():
    log, calls = [], {"b": 0}

    def flaky():
        calls["b"] += 1
        log.append("b")
        if calls["b"] > 4:                      # passes its first calls (the check, the warm-up), then fails
            raise RuntimeError("lost the device")

    timing = benchmark.Timing(warmup_s=0.0, budget_s=0.0, min_reps=6, max_reps=6)
    a, b, c = benchmark.time_rotation([[lambda: log.append("a0"), lambda: log.append("a1")], [flaky],
                                       [lambda: log.append("c")]], timing)
    assert a["reps"] == 6 and c["reps"] == 6 and a["min_s"] <= a["median_s"] <= a["q3_s"]
    assert isinstance(b, RuntimeError) and "lost the device" in str(b)
    timed = log[log.index("c") + 1:]            # after the first call of each: one call of each per round
    sizes = [3, 3, 3, 3, 2, 2]                  # b's 5th call (in the 4th round) raised: it left the rotation
    rounds = [timed[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    assert sum(sizes) == len(timed)
    for n, r in enumerate(rounds):
        assert sorted(r) == sorted([f"a{n % 2}", "c"] + (["b"] if n < 4 else [])), (n, r)
    assert len({tuple(x[0] for x in r) for r in rounds[:4]}) > 1   # the order changes from round to round


def test_rotation_companion_runs_while_an_implementation_is_left():
    calls = {"a": 0, "ceiling": 0}

    def impl():
        calls["a"] += 1
        if calls["a"] > 3:                      # first touch + 2 timed rounds, then it fails
            raise RuntimeError("gone")

    def ceiling():
        calls["ceiling"] += 1

    timing = benchmark.Timing(warmup_s=0.0, budget_s=10.0, min_reps=3, max_reps=50)
    a, c = benchmark.time_rotation([[impl]], timing, companion=[ceiling])
    assert isinstance(a, RuntimeError)
    assert c["reps"] <= 3 and calls["ceiling"] <= 4      # it stopped with the implementation, not at max_reps


def test_rotation_budget_is_each_implementations_own():
    """A slow peer stops at min_reps without cutting a fast implementation short: each has its own budget."""
    import time
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)
    timing = benchmark.Timing(warmup_s=0.0, budget_s=0.05, min_reps=3, max_reps=40)
    f, s = benchmark.time_rotation([[fast], [slow]], timing)
    assert f["reps"] == 40 and 3 <= s["reps"] <= 4


def test_peers_in_their_own_layout_and_precision():
    """The peers' inputs, converted once outside the timed calls: SDPA in (B, H, S, D); the decode peer's cache in
    (B, Hkv, S, D) with the queries grouped by kv head; the fp32-widened peers return the case's dtype. Each gives
    the reference's answer in fastlm's layout; a convert is refused in a backward case (its tensors would be the
    gradients' leaves)."""
    from types import SimpleNamespace

    from fastlm import bench_suites as bs
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, h, 16, generator=gen) for h in (8, 2, 2))
    want = reference.attention(q, k, v, causal=True)
    inputs = bs.bhsd({"q": q, "k": k, "v": v})
    assert inputs["q"].shape == (2, 8, 9, 16) and inputs["q"].is_contiguous()
    torch.testing.assert_close(bs.sdpa_bhsd(**inputs, causal=True), want, rtol=1e-5, atol=1e-5)
    lens = torch.tensor([9, 9], dtype=torch.int32)
    layout = bs.decode_layout({"q": q[:, -1:], "k_cache": k, "v_cache": v, "cache_seqlens": lens})
    assert layout["q"].shape == (2, 2, 4, 16) and layout["k_cache"].shape == (2, 2, 9, 16)
    torch.testing.assert_close(bs.sdpa_decode(**layout, length=9), reference.decode_attention(q[:, -1:], k, v, lens),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one new token's queries; got 2"):
        bs.decode_layout({"q": q[:, -2:], "k_cache": k, "v_cache": v, "cache_seqlens": lens})
    half = {name: t.bfloat16() for name, t in (("q", q), ("k", k), ("v", v))}
    peer = bs.rounded(functools.partial(bs.sdpa_bhsd, causal=True), torch.bfloat16)
    out = peer(**bs.widened(bs.bhsd)(half))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.attention(*half.values(), causal=True), rtol=2e-2, atol=2e-2)
    ctx = SimpleNamespace(device=torch.device("cpu"), tiny=False, suite="quick", compile=False)
    case = bs._attention_case(ctx, ["torch"], 1, 2, 2, 16, 16, True, torch.float32, "bwd", False)
    impl = benchmark.Impl("sdpa", "peer", bs.sdpa_bhsd, convert=bs.bhsd)
    with pytest.raises(ValueError, match="convert serves forward cases only, got mode 'bwd'"):
        case.check(impl, torch.device("cpu"))


def test_a_case_can_ask_for_more_timed_calls():
    case = _rms_case([benchmark.Impl("fastlm[good]", "fastlm", reference.rms_norm),
                      benchmark.Impl("eager", "peer", reference.rms_norm)])
    case.min_reps = 5                               # as the whole-model cases do
    ctx = benchmark.Context(device=torch.device("cpu"), timing=benchmark.Timing(0.0, 0.0, 2, 10))
    assert [r.reps for r in benchmark.run([case], ctx, progress=False)] == [5, 5]
    ctx = benchmark.Context(device=torch.device("cpu"), timing=benchmark.TINY)   # the self-check keeps its cap
    assert all(r.reps <= benchmark.TINY.max_reps for r in benchmark.run([case], ctx, progress=False))


def test_wrong_fastlm_result_makes_the_cli_fail(tmp_path, monkeypatch, capsys):
    from fastlm import bench_suites
    monkeypatch.setattr(bench_suites, "cases", lambda ops, ctx, **kw: [
        _rms_case([benchmark.Impl("fastlm[bad]", "fastlm", _off_by_a_little),
                   benchmark.Impl("eager", "peer", reference.rms_norm)])])
    assert benchmark.cli(["--tiny", "--no-plots", "--out", str(tmp_path)]) == 1
    doc = benchmark.load(str(tmp_path / "bench.json"))
    bad = [r for r in doc["results"] if r["impl"] == "fastlm[bad]"]
    assert bad[0]["status"] == "wrong" and bad[0]["correct"] is False
    assert "WRONG" in capsys.readouterr().out


# -- the CLI end to end on tiny shapes, and the JSON schema --------------------------------------------------------

RESULT_FIELDS = {"op": str, "case": str, "shape": dict, "dtype": str, "mode": str, "impl": str, "kind": str,
                 "status": str, "message": str, "reps": int, "speedup": dict, "check": str, "bound": str,
                 "ceiling_in_rotation": bool}
ENV_FIELDS = ("date", "device", "device_name", "cpu_model", "cpu_isa", "kernels_isa", "cpu_bf16", "cpu_amx",
              "gpu_model", "threads", "python", "torch", "triton", "cuda", "transformers", "fastlm", "fastlm_commit",
              "extension")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # tests/conftest.py sets TRITON_INTERPRET=1 on a CPU; the benchmark never times the interpreter, and its
    # model cases refuse backend="auto" while it is set: run as `python -m fastlm bench` would, without it
    saved = os.environ.pop("TRITON_INTERPRET", None)
    threads = torch.get_num_threads()
    try:
        rc = benchmark.cli(["--tiny", "--no-compile", "--threads", "2", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return rc, out


def test_default_ops():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert benchmark.default_ops(cpu, "quick") == list(benchmark.CPU_QUICK_OPS)
    assert benchmark.default_ops(cpu, "full") == benchmark.default_ops(cuda, "quick") == list(benchmark.OPS)
    assert benchmark.default_ops(cpu, "quick", tiny=True) == list(benchmark.OPS)


def test_isa_left_out_names_what_the_build_lacks():
    host = ["AVX2", "FMA", "AVX-512", "AVX512-BF16", "AMX-BF16"]
    assert benchmark.isa_left_out({"cpu_isa": host, "kernels_isa": host}) == []
    assert benchmark.isa_left_out({"cpu_isa": host, "kernels_isa": host[:4]}) == ["AMX-BF16"]
    assert benchmark.isa_left_out({"cpu_isa": host, "kernels_isa": ["AVX2", "FMA"]}) == host[2:]
    assert benchmark.isa_left_out({"cpu_isa": host, "kernels_isa": []}) == host
    assert benchmark.isa_left_out({"cpu_isa": host, "kernels_isa": None}) == []        # no extension
    assert benchmark.isa_left_out({"cpu_isa": host}) == []                             # a JSON from before the field


@pytest.mark.timeout(600)  # (the module's tiny bench runs in the first test that asks for it: compiles on a GPU)
def test_cli_tiny_run_writes_json_table_and_plots(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    doc = benchmark.load(str(out / "bench.json"))
    assert doc["schema"] == benchmark.SCHEMA
    for key in ENV_FIELDS:
        assert key in doc["env"], key
    assert doc["env"]["threads"] == 2 and doc["env"]["device"] in ("cpu", "cuda")
    with open("/proc/cpuinfo") as f:                                   # the extensions the C++ kernels build for
        flags = next(line for line in f if line.startswith("flags")).split()
    assert ("AVX2" in doc["env"]["cpu_isa"]) == ("avx2" in flags)
    assert ("AVX512-BF16" in doc["env"]["cpu_isa"]) == ("avx512_bf16" in flags)
    ext = backends.extension()                                         # and the ones they were built for
    assert doc["env"]["kernels_isa"] == (None if ext is None else list(ext.cpu_isa))
    assert set(doc["env"]["kernels_isa"] or ()) <= set(doc["env"]["cpu_isa"])
    # where bf16 matrix products ran: by default on ATen's kernels exactly where the CPU has AMX-BF16
    assert doc["env"]["cpu_bf16"] == (None if ext is None else "aten" if "amx_bf16" in flags else "fastlm")
    # and fastlm's AMX attention exactly where the CPU has AMX-BF16 and the kernels were built for it
    assert doc["env"]["cpu_amx"] == (None if ext is None else "AMX-BF16" in ext.cpu_isa and "amx_bf16" in flags)
    assert doc["config"]["tiny"] is True and doc["config"]["compile"] is False
    ceilings = doc["ceilings"]
    assert ceilings["copy_bytes_per_s"] > 0 and ceilings["matmul_flop_per_s"]["float32"] > 0
    for dt, rate in ceilings["matmul_flop_per_s"].items():   # on a CPU bf16/fp16 count fp32 arithmetic as theirs
        expected = max(rate, ceilings["matmul_flop_per_s"]["float32"]) if dt in ("bfloat16", "float16") else rate
        assert ceilings["compute_flop_per_s"][dt] == (expected if doc["env"]["device"] == "cpu" else rate)
    results = doc["results"]
    assert {r["op"] for r in results} == set(benchmark.OPS)
    for r in results:
        for key, typ in RESULT_FIELDS.items():
            assert isinstance(r[key], typ), (key, r)
        assert r["status"] in ("ok", "wrong", "error", "unavailable", "skipped")
    timed = [r for r in results if r["status"] == "ok"]
    assert timed and all(r["median_s"] > 0 and r["reps"] >= benchmark.TINY.min_reps for r in timed)
    fastlm_rows = [r for r in results if r["kind"] == "fastlm"]
    assert fastlm_rows and all(r["impl"].split("+")[0] in ("fastlm[cpu]", "fastlm[torch]", "fastlm[triton]",
                                                          "fastlm[cuda]", "fastlm[cuda-mma]")
                               or r["status"] == "unavailable" for r in fastlm_rows)
    # the Triton interpreter is never what a CPU run times
    assert not any(r["backend"] == "triton" and r["median_s"] for r in results if doc["env"]["device"] == "cpu")
    for r in timed:
        assert r["max_err"] is not None and r["correct"] is not False
        rate = r["flop_per_s"] or r["bytes_per_s"] or r["tokens_per_s"]
        assert rate and rate > 0
        if r["kind"] == "fastlm":
            assert r["speedup"], r
        # % of ceiling: against the ceiling kernel timed in the case's rotation on a CPU, the run's ceiling on a GPU
        assert r["ceiling_in_rotation"] == (doc["env"]["device"] == "cpu"), r
        if r["ceiling_in_rotation"]:   # which kernel: a memory-bound op's is a read of its own bytes
            want = "matmul" if r["bound"] == "compute" else "copy" if r["op"] == "model" else "read of the case's"
            assert r["ceiling_kernel"].startswith(want), r
        rate = r["flop_per_s"] if r["bound"] == "compute" else r["bytes_per_s"]
        if rate:
            assert r["ceiling"] > 0 and r["pct_ceiling"] == pytest.approx(100 * rate / r["ceiling"])
    assert {"attention.png", "decode.png", "model.png"} <= set(doc["plots"])
    for name in doc["plots"]:
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_result_ceiling_from_rotation_or_run():
    def row(bound, dtype="float32"):
        return benchmark.Result(op="op", case="c", shape={}, dtype=dtype, mode="fwd", impl="fastlm[cpu]",
                                kind="fastlm", flops=2e9, bytes=1e9, bound=bound)
    stats = {"median_s": 0.1, "min_s": 0.1, "q1_s": 0.1, "q3_s": 0.1, "reps": 3}
    run = {"compute_flop_per_s": {"float32": 40e9, "bfloat16": 40e9}, "copy_bytes_per_s": 20e9}
    r = row("compute")
    r.finish(stats, run)                      # 20 GFLOP/s of the run's 40
    assert (r.ceiling, r.ceiling_in_rotation, r.pct_ceiling) == (40e9, False, pytest.approx(50.0))
    r = row("memory")
    r.finish(stats, run, in_rotation=12.5e9)  # 10 GB/s of the 12.5 measured in the rotation
    assert (r.ceiling, r.ceiling_in_rotation, r.pct_ceiling) == (12.5e9, True, pytest.approx(80.0))
    r = row("compute", dtype="float64")       # no ceiling for the dtype: no %
    r.finish(stats, run)
    assert r.pct_ceiling is None and r.ceiling is None


def test_rotation_ceiling_kernel_follows_the_bound_and_dtype():
    kernels = benchmark.CeilingKernels(torch.device("cpu"), tiny=True)
    ceilings = benchmark.measure_ceilings(torch.device("cpu"), [torch.float32, torch.bfloat16], benchmark.TINY,
                                          kernels=kernels)
    ctx = benchmark.Context(device=torch.device("cpu"), timing=benchmark.TINY, ceilings=ceilings,
                            ceiling_kernels=kernels)

    def row(bound, dtype):
        return benchmark.Result(op="op", case="c", shape={}, dtype=dtype, mode="fwd", impl="x", kind="fastlm",
                                bound=bound)
    fns, work, name = benchmark.rotation_ceiling([row("memory", "float32")], ctx)     # a model case: the copy
    assert fns is kernels.copy() and work == kernels.copy_bytes and name.startswith("copy")
    op_row = row("memory", "float32")
    op_row.bytes = 4000 + 2
    fns, work, name = benchmark.rotation_ceiling([op_row], ctx, n_sets=3)             # an op case: a read of its bytes
    assert len(fns) == 3 and work == op_row.bytes and "3 sets" in name
    assert all(torch.isfinite(fn()) for fn in fns) and len({fn() for fn in fns}) == 3    # three different buffers
    n = kernels.n
    fns, work, name = benchmark.rotation_ceiling([row("compute", "bfloat16")], ctx)
    assert fns is kernels.gemm(getattr(torch, ceilings["compute_gemm_dtype"]["bfloat16"])) and "matmul" in name
    assert work == benchmark.gemm_flops(n, n, n) and fns[0]().dtype in (torch.float32, torch.bfloat16)
    assert benchmark.rotation_ceiling([], ctx) is None
    no_kernels = dataclasses.replace(ctx, ceiling_kernels=None)                  # a GPU run
    assert benchmark.rotation_ceiling([row("memory", "float32")], no_kernels) is None


def test_summary_of_an_earlier_run_through_the_fastlm_command(tiny_run, capsys):
    from fastlm.__main__ import main
    _, out = tiny_run
    assert main(["bench", "--summary-of", str(out / "bench.json")]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["op", "case", "fastlm", "rate", "best", "peer", "ratio", "max", "err"]
    assert "attention" in text and "model" in text


@pytest.mark.parametrize("argv,message", [(["--ops", "attention,warp"], "--ops"),
                                          (["--dtype", "float8"], "--dtype"),
                                          (["--backend", "triton"], "--backend"),
                                          (["--threads", "0"], "--threads"),
                                          (["--threads", "100000"], "--threads must be an integer in [1, ")])
def test_cli_rejects_bad_options(argv, message, capsys):
    if "--backend" in argv and torch.cuda.is_available():
        pytest.skip("triton is a valid backend on a GPU")
    assert benchmark.cli(argv + ["--tiny"]) == 2                       # (as every fastlm command's usage error)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_rejects_an_out_that_is_a_file_before_measuring(tmp_path, monkeypatch, capsys):
    from fastlm import bench_suites

    def no_cases(*args, **kw):
        raise AssertionError("the cases were built")

    monkeypatch.setattr(bench_suites, "cases", no_cases)
    (tmp_path / "afile").write_text("keep")
    assert benchmark.cli(["--tiny", "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'afile'} is a file; expected a directory\n"
    assert (tmp_path / "afile").read_text() == "keep"
    # a directory that cannot be created (under a file, or no path at all) is refused before measuring too
    for out, message in ((tmp_path / "afile" / "sub", f"cannot be created: {tmp_path / 'afile'} is a file"),
                         ("", "must be a directory path, got an empty string")):
        assert benchmark.cli(["--tiny", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_plots_are_skipped_without_matplotlib(monkeypatch, capsys, tmp_path):
    """matplotlib is optional (the plots extra): without it bench, train and scaling skip their plots with a note
    and keep everything else."""
    import sys

    from fastlm import _plots, train
    monkeypatch.setitem(sys.modules, "matplotlib", None)                 # import matplotlib -> ImportError
    assert _plots.pyplot("the plots") is None
    assert "matplotlib is not installed: the plots skipped" in capsys.readouterr().err
    rows = [{"op": "attention", "case": "x", "median_s": 1.0, "status": "ok"}]
    assert benchmark.plot(rows, str(tmp_path), {"device": "cpu", "device_name": "cpu", "threads": 1}) == []
    history = {"step": [1, 2], "loss": [3.0, 2.0]}
    assert train.plot_loss(history, str(tmp_path / "loss.png")) is None and not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("content, message", [
    (None, "nonexistent.json: no such file (expected the bench.json of an earlier"),
    ("{bad", "not valid JSON"),
    ("[1, 2]", "not a fastlm bench JSON"),
    ('{"env": {}}', "not a fastlm bench JSON (schema None"),
    ('{"schema": "%s"}' % benchmark.SCHEMA, "a fastlm bench JSON without a list of results"),
    ('{"schema": "%s", "results": 5}' % benchmark.SCHEMA, "without a list of results"),
    ('{"schema": "%s", "results": [{"op": "rope"}]}' % benchmark.SCHEMA, "result 0 lacks case, shape, dtype"),
])
def test_summary_of_a_missing_or_bad_file(tmp_path, content, message, capsys):
    path = tmp_path / "nonexistent.json"
    if content is not None:
        path.write_text(content)
    assert benchmark.cli(["--summary-of", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --summary-of: ") and message in err
    assert benchmark.cli(["--summary-of", str(tmp_path)]) == 2
    assert "is a directory; expected the bench.json" in capsys.readouterr().err


# -- README performance section ------------------------------------------------------------------------------------

def _perf_to_readme(*args):
    spec = importlib.util.spec_from_file_location("perf_to_readme", os.path.join(ROOT, "bench", "perf_to_readme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_perf_to_readme_replaces_only_the_marked_section(tiny_run, tmp_path):
    _, out = tiny_run
    readme = tmp_path / "README.md"
    readme.write_text("# fastlm\n\nintro\n\n## Performance\n<!-- perf:start -->\nold table\n<!-- perf:end -->\n\n"
                      "## Next\nkept\n")
    args = (str(out / "bench.json"), "--readme", str(readme), "--note", "measured on a shared machine")
    assert _perf_to_readme(*args) == 0
    text = readme.read_text()
    assert "*measured on a shared machine*" in text and "Tiny shapes" in text
    assert text.startswith("# fastlm\n\nintro\n\n## Performance\n<!-- perf:start -->\n")
    assert text.endswith("<!-- perf:end -->\n\n## Next\nkept\n")
    assert "old table" not in text and ("CPU figures" in text or "GPU figures" in text)
    isa = benchmark.load(str(out / "bench.json"))["env"]["cpu_isa"]
    below = bool(benchmark.isa_left_out(benchmark.load(str(out / "bench.json"))["env"]))
    if "CPU figures" in text and isa:                                  # the extensions beside the CPU's name
        assert (f"({', '.join(isa)}), 2 threads" in text) == (not below)
        assert ("C++ kernels built for" in text) == below              # and the build's, where it has fewer
        env = benchmark.load(str(out / "bench.json"))["env"]
        assert ("bf16 GEMMs on ATen's kernels" in text) == (env["cpu_bf16"] == "aten")
        assert ("bf16 attention on fastlm's AMX-BF16 kernel" in text) == env["cpu_amx"]
    assert "| op | case | fastlm |" in text and "![" in text
    assert "by `python -m fastlm bench --tiny --no-compile --threads 2` " in text    # as it ran, but for --out
    for line in text.splitlines():
        if line.startswith("!["):
            assert (tmp_path / line.split("(")[1].rstrip(")")).exists()
    data = [line for line in text.splitlines() if line.startswith("<sub>Generated by")][0].split("(")[1].split(")")[0]
    assert (tmp_path / data).read_bytes() == (out / "bench.json").read_bytes()    # the table's data, beside it
    assert _perf_to_readme(*args) == 0                                                 # idempotent
    assert readme.read_text() == text


def test_perf_to_readme_without_markers_fails_clearly(tiny_run, tmp_path):
    _, out = tiny_run
    readme = tmp_path / "README.md"
    readme.write_text("# fastlm\n\nno markers here\n")
    with pytest.raises(SystemExit) as e:
        _perf_to_readme(str(out / "bench.json"), "--readme", str(readme))
    assert "<!-- perf:start -->" in str(e.value) and "marking the performance section" in str(e.value)
    assert readme.read_text() == "# fastlm\n\nno markers here\n" and not (tmp_path / "docs").exists()


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_cuda_kernels_are_forced_only_during_the_call(monkeypatch):
    from fastlm import bench_suites
    monkeypatch.setenv("FASTLM_CUDA_KERNELS", "auto")
    seen = []

    def fn(**inputs):
        seen.append((os.environ["FASTLM_CUDA_KERNELS"], inputs))
        if inputs.get("fail"):
            raise RuntimeError("boom")
        return 1

    assert bench_suites._with_cuda_kernels("mma", fn)(q=2) == 1
    with pytest.raises(RuntimeError, match="boom"):
        bench_suites._with_cuda_kernels("mma", fn)(fail=True)
    assert seen == [("mma", {"q": 2}), ("mma", {"fail": True})]
    assert os.environ["FASTLM_CUDA_KERNELS"] == "auto"
    monkeypatch.delenv("FASTLM_CUDA_KERNELS")
    bench_suites._with_cuda_kernels("mma", fn)()
    assert "FASTLM_CUDA_KERNELS" not in os.environ


def test_cuda_mma_peer_only_where_cuda_runs_wgmma(monkeypatch):
    """fastlm[cuda-mma] is measured beside "cuda" only on a CUDA device of compute capability 9.x with an sm_90a
    build, for cases the wgmma kernels serve; its calls run with FASTLM_CUDA_KERNELS=mma."""
    from types import SimpleNamespace

    from fastlm import bench_suites
    seen = []
    cuda = benchmark.Impl("fastlm[cuda]", "fastlm", lambda **kw: seen.append(os.environ.get("FASTLM_CUDA_KERNELS")),
                          backend="cuda")
    impls = [benchmark.Impl("fastlm[triton]", "fastlm", lambda **kw: None, backend="triton"), cuda]
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(bench_suites, "extension", lambda: SimpleNamespace(with_sm90a=True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("FASTLM_CUDA_KERNELS", raising=False)
    peer, = bench_suites._cuda_mma_impl(gpu, impls, True)
    assert (peer.name, peer.kind, peer.backend) == ("fastlm[cuda-mma]", "fastlm", "cuda")
    peer.fn(q=1)
    assert seen == ["mma"] and "FASTLM_CUDA_KERNELS" not in os.environ
    assert bench_suites._cuda_mma_impl(gpu, impls, False) == []                       # a case wgmma does not serve
    assert bench_suites._cuda_mma_impl(gpu, impls[:1], True) == []                    # "cuda" not measured
    assert bench_suites._cuda_mma_impl(SimpleNamespace(device=torch.device("cpu")), impls, True) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert bench_suites._cuda_mma_impl(gpu, impls, True) == []                        # not Hopper
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(bench_suites, "extension", lambda: SimpleNamespace(with_sm90a=False))
    assert bench_suites._cuda_mma_impl(gpu, impls, True) == []                        # built without sm_90a


@pytest.mark.parametrize("suite", ["quick", "full"])
def test_gpu_suites_build_on_a_cpu_machine(suite):
    """The GPU suites' cases (shapes, rates, implementations) are built here, so that the one GPU run cannot fail on
    them: a decode step's MLP is rated in bytes, larger ones in FLOPs; the decode step captured in a CUDA graph is
    timed in both suites, the compiled one in the full suite only."""
    from types import SimpleNamespace

    from fastlm import bench_suites
    ctx = SimpleNamespace(device=torch.device("cuda"), tiny=False, suite=suite, compile=True)
    cases = {name: fn(ctx, None, None) for name, fn in bench_suites.SUITES.items()}
    assert all(cases.values())
    for c in cases["ffn"]:
        T, d, f, kind = (c.shape[k] for k in ("tokens", "d_model", "intermediate", "kind"))
        if T <= bench_suites.DECODE_TOKENS:
            assert c.flops is None and c.bytes == benchmark.mlp_bytes(T, d, f, kind, 2)
        else:
            assert c.bytes is None and c.flops == benchmark.mlp_flops(T, d, f, kind, mode=c.mode)
    assert any(c.shape["tokens"] == 1 for c in cases["ffn"])
    for c in cases["ffn"]:  # the cuBLASLt-epilogue peer: forward GPT-2 MLPs only (its op has no backward)
        assert any(i.name == "cublaslt" for i in c.impls) == (c.shape["kind"] == "gelu" and c.mode == "fwd")
    for c in cases["model"]:
        graphs = [i for i in c.impls if i.name.endswith("+graphs")]
        compiled = [i for i in c.impls if i.name.endswith("+compile")]
        assert all(i.kind == "fastlm" and i.cuda_graph and not i.compiled for i in graphs)
        assert all(i.kind == "fastlm" and i.compiled for i in compiled)
        assert len(graphs) == (1 if c.kind == "decode" else 0), (suite, c.name)
        assert len(compiled) == (1 if suite == "full" and c.kind == "decode" else 0), (suite, c.name)
        # the quick suite (the GPU check's three minutes): no compiled 1B model, 32 new tokens, three timed rounds
        assert ("compile" in c.peer_names) == (suite == "full" and c.kind != "decode"), (suite, c.name)
        assert c.new_tokens == (0 if c.kind != "decode" else 128 if suite == "full" else 32)
        assert c.min_reps == 3


@pytest.mark.parametrize("broken", [False, True], ids=["right", "decode step off by 5%"])
def test_16_bit_decode_steps_are_held_to_the_rule_on_their_logits(monkeypatch, broken):
    """In bf16 greedy tokens may flip on near-ties, so fastlm's decode row is judged by its decode step's logits: a
    decode attention 5% off is WRONG even where the tokens still agree."""
    from fastlm import bench_suites
    from fastlm import model as fastlm_model
    if broken:
        real = fastlm_model.ops.decode_attention
        monkeypatch.setattr(fastlm_model.ops, "decode_attention", lambda *a, **k: real(*a, **k) * 1.05)
    ctx = benchmark.Context(device=torch.device("cpu"), timing=benchmark.TINY, compile=False, tiny=True)
    case = bench_suites.ModelCase(ctx, ["torch"], "llama-tiny", "decode", 1, 8, torch.bfloat16, 4, ("transformers",))
    rows = {r.impl: r for r in benchmark.run([case], ctx, progress=False)}
    fast = rows["fastlm[torch]"]
    assert fast.check.startswith("decode-step logits after 8 tokens; greedy tokens vs transformers: ")
    assert fast.correct is (not broken) and fast.ref_err is not None
    assert rows["transformers"].correct is None                 # a peer's tokens are not judged at 16 bits
    assert ("WRONG" in benchmark.err_text(fast.__dict__)) == broken


def test_attention_checked_at_a_smaller_shape_is_spot_checked_at_the_timed_one():
    """An attention case too big for the float64 reference is checked at a shorter length, and its last queries at
    the timed length: a kernel wrong only for long sequences is WRONG."""
    from types import SimpleNamespace

    from fastlm import bench_suites
    ctx = SimpleNamespace(device=torch.device("cpu"), tiny=False, suite="quick", compile=False)
    case = bench_suites._attention_case(ctx, ["torch"], 1, 16, 16, 2048, 64, True, torch.float32, "fwd", False)
    assert case.check_case is not None and case.check_case.shape["seqlen"] < 1500

    def right(q, k, v):
        return bench_suites.sdpa_attention(q, k, v, causal=True)

    def wrong_past_1500(q, k, v):
        out = right(q, k, v)
        out[:, 1500:] *= 1.01
        return out
    for fn, ok in ((right, True), (wrong_past_1500, False)):
        err, ref_err, passed, what = case.check(benchmark.Impl("x", "peer", fn), torch.device("cpu"))
        assert passed is ok and what.endswith("and a part of the output at the timed shape"), (fn, what)


def test_cuda_rows_unavailable_where_the_cuda_kernels_do_not_serve():
    """A case outside the CUDA kernels' domain (fp32, other head dims, MLP widths not multiples of 8) gets an
    "unavailable" fastlm[cuda] row, not a failed one (which would make the bench exit 1 on a GPU)."""
    from types import SimpleNamespace

    from fastlm import bench_suites
    assert "fp16/bf16" in bench_suites.cuda_limits(torch.float32, 64)
    assert "head dims" in bench_suites.cuda_limits(torch.bfloat16, 40)
    assert "multiples of 8" in bench_suites.cuda_limits(torch.float16, dims=(20, 64))
    assert bench_suites.cuda_limits(torch.bfloat16, 128) is None and bench_suites.cuda_limits(torch.float16,
                                                                                               dims=(64, 176)) is None
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    triton, cuda = bench_suites.fastlm_impls("attention", gpu, ["triton", "cuda"], cuda_limit="no fp32 here",
                                             causal=True)
    assert (triton.name, cuda.name) == ("fastlm[triton]", "fastlm[cuda]")
    with pytest.raises(benchmark.Unavailable, match="fastlm.cuda.: no fp32 here") as e:
        cuda.fn(q=None, k=None, v=None)
    assert benchmark.failure(e.value)[0] == "unavailable"


def test_list_options_take_each_item_once():
    assert benchmark._parse_list("rope,rope, norm", benchmark.OPS, "ops") == ["rope", "norm"]
    with pytest.raises(ValueError, match="--ops takes a comma-separated list of"):
        benchmark._parse_list("rope,nope", benchmark.OPS, "ops")


@pytest.mark.parametrize("argv, code", [([], 0), (["--help"], 0), (["bnech"], 2)])
def test_fastlm_command_usage(argv, code, capsys):
    from fastlm.__main__ import COMMANDS, main
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m fastlm COMMAND") and all(f"  {name} " in out for name in COMMANDS)
    assert err == ("" if code == 0 else "\nerror: unknown command 'bnech'; choose one of " + ", ".join(COMMANDS) + "\n")
