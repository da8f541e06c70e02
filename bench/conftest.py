"""pytest-benchmark suites over the same cases as ``python -m fastlm bench`` (fastlm.bench_suites).

    pytest bench/ --benchmark-json=out.json [--fastlm-suite full] [--fastlm-no-compile] [--fastlm-tiny]

Each test file names its op (OP = "attention", ...); this conftest parametrizes it over (case, implementation) pairs,
checks the implementation against the float64 reference first (a wrong fastlm result fails the test) and times it
with benchmark.pedantic, an L2 flush before each round on a GPU. Rates, % of the ceilings and the error go into each
benchmark's extra_info. Never the Triton interpreter: on a CPU the "cpu"/"torch" backends are measured.
"""
import itertools
import re
import time

import pytest
import torch

from fastlm import bench_suites
from fastlm import benchmark as harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_addoption(parser):
    group = parser.getgroup("fastlm")
    group.addoption("--fastlm-suite", choices=("quick", "full"), default="quick", help="case list (default quick)")
    group.addoption("--fastlm-tiny", action="store_true", help="tiny shapes (checks the suites themselves)")
    group.addoption("--fastlm-no-compile", action="store_true", help="skip the torch.compile peers")


def _context(config) -> harness.Context:
    suite, tiny = config.getoption("--fastlm-suite"), config.getoption("--fastlm-tiny")
    return harness.Context(device=DEVICE, timing=harness.timing_for(suite, DEVICE, tiny),
                           compile=not config.getoption("--fastlm-no-compile"), tiny=tiny, suite=suite)


def _id(case, impl) -> str:
    dtype = harness.SHORT_DTYPE.get(case.dtype, str(case.dtype))
    return re.sub(r"[^A-Za-z0-9_.+\[\]/-]+", "-", f"{case.name}-{dtype}-{case.mode}-{impl.name}")


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    ctx = _context(metafunc.config)
    bench_suites.configure_compile()
    items, ids = [], []
    for case in bench_suites.cases([metafunc.module.OP], ctx):
        for impl in case.impls or [harness.Impl("fastlm", "fastlm", None)]:
            items.append((case, impl))
            ids.append(_id(case, impl))
    metafunc.parametrize("bench_item", items, ids=ids)


@pytest.fixture(scope="session")
def bench_context(request):
    ctx = _context(request.config)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE.type == "cuda" else [])
    ctx.ceilings = harness.measure_ceilings(DEVICE, dtypes, ctx.timing, tiny=ctx.tiny)
    return ctx


@pytest.fixture
def run_benchmark(benchmark, bench_context):
    """Check, then time one (case, implementation) pair; returns its fastlm.benchmark.Result."""
    ctx = bench_context
    cuda = DEVICE.type == "cuda"

    def run(item):
        case, impl = item
        if getattr(case, "skip_reason", ""):
            pytest.skip(case.skip_reason)
        try:
            res, calls = case.prepare(impl, ctx)
        except Exception as e:  # noqa: BLE001 - an implementation that cannot run here is skipped, not failed
            status, message = harness.failure(e)
            if status != "unavailable":
                raise
            if impl.fallback is None:
                pytest.skip(message)
            res, calls = case.prepare(impl.fallback, ctx)
        cycle = itertools.cycle(calls)

        def target():
            next(cycle)()
            if cuda:
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        target()
        first = time.perf_counter() - t0
        rounds = int(max(ctx.timing.min_reps, min(ctx.timing.max_reps, ctx.timing.budget_s / max(first, 1e-9))))
        flush = harness.L2Flush(DEVICE) if cuda else None

        def setup():  # the flush finishes before the timer starts (target() synchronizes, and would wait for it)
            flush()
            torch.cuda.synchronize()
        benchmark.pedantic(target, setup=setup if cuda else None, rounds=rounds, warmup_rounds=1, iterations=1)
        stats = benchmark.stats.stats
        res.finish({"median_s": stats.median, "min_s": stats.min, "q1_s": stats.q1, "q3_s": stats.q3,
                    "reps": stats.rounds}, ctx.ceilings)
        if cuda:
            # pytest-benchmark's host clock includes the launch and the synchronize, the ceilings' CUDA events do
            # not: no % of ceiling from it (python -m fastlm bench times kernels with CUDA events)
            res.pct_ceiling = None
        case.finalize(res, ctx)
        benchmark.extra_info.update({k: getattr(res, k) for k in (
            "op", "case", "dtype", "mode", "impl", "kind", "backend", "flops", "bytes", "tokens", "flop_per_s",
            "bytes_per_s", "tokens_per_s", "pct_ceiling", "max_err", "ref_err", "correct", "check", "peak_mem_bytes")})
        assert not (res.kind == "fastlm" and res.correct is False), (
            f"WRONG: {res.impl} on {res.case} {res.dtype} {res.mode}: max error {res.max_err:.3e} fails the numerics "
            f"rule (PyTorch's own error at this dtype: {res.ref_err:.3e}; checked: {res.check})")
        return res

    return run
