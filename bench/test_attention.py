"""pytest-benchmark: fastlm's attention against its peers (cases from fastlm.bench_suites; see conftest.py)."""
OP = "attention"


def test_attention(bench_item, run_benchmark):
    run_benchmark(bench_item)
