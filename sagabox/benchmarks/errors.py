"""The benchmarks' one error: a run that could not be measured (not a slow one)."""

from __future__ import annotations

from outbox_relay.errors import SagaboxError


class BenchError(SagaboxError):
    """A benchmark could not run: a process died, a saga never ended, a tool is missing."""
