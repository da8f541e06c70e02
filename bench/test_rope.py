"""pytest-benchmark: fastlm's rope against its peers (cases from fastlm.bench_suites; see conftest.py)."""
OP = "rope"


def test_rope(bench_item, run_benchmark):
    run_benchmark(bench_item)
