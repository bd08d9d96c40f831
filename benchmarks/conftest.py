"""pytest-benchmark settings shared by the benchmark suites (run them with `pytest benchmarks/...`)."""
import torch


def pytest_report_header(config):
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"
