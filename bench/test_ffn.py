"""pytest-benchmark: fastlm's ffn against its peers (cases from fastlm.bench_suites; see conftest.py)."""
OP = "ffn"


def test_ffn(bench_item, run_benchmark):
    run_benchmark(bench_item)
