"""pytest-benchmark: fastlm's cross_entropy against its peers (cases from fastlm.bench_suites; see conftest.py)."""
OP = "cross_entropy"


def test_cross_entropy(bench_item, run_benchmark):
    run_benchmark(bench_item)
