"""A pytest plugin (`-p tests.failures_at_once`) that prints a failed test's report as soon as
it fails instead of at the end of the run: the GPU suite kills a test step at its time limit,
and pytest's end-of-run report, the tracebacks with it, would then never be printed."""

from __future__ import annotations

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Write the report of a failed setup, call or teardown to the terminal right away."""
    if not report.failed:
        return
    print(f"\n{'_' * 20} {report.nodeid} ({report.when}) failed {'_' * 20}\n"
          f"{report.longreprtext}\n", flush=True)
