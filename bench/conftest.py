"""Benchmark session helpers: speed ratios measured inside a test, printed in the summary."""

import pytest

_RATIOS = []


@pytest.fixture
def report_ratio():
    """Call with one line of ratios; the lines are printed after the benchmark tables."""
    return _RATIOS.append


def pytest_terminal_summary(terminalreporter):
    if _RATIOS:
        terminalreporter.section("speed ratios (baselines timed in the same test, interleaved)")
        for line in _RATIOS:
            terminalreporter.write_line(line)
