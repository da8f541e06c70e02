"""pytest-benchmark: fastlm's decode against its peers (cases from fastlm.bench_suites; see conftest.py)."""
OP = "decode"


def test_decode(bench_item, run_benchmark):
    run_benchmark(bench_item)
