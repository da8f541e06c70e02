"""pytest-benchmark: fastlm's model against its peers (cases from fastlm.bench_suites; see conftest.py)."""
OP = "model"


def test_model(bench_item, run_benchmark):
    run_benchmark(bench_item)
