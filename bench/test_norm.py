"""pytest-benchmark: fastlm's norm against its peers (cases from fastlm.bench_suites; see conftest.py)."""
OP = "norm"


def test_norm(bench_item, run_benchmark):
    run_benchmark(bench_item)
