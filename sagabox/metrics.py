"""The Prometheus endpoint every long-running process may serve.

Each process serves its metrics on ``SAGABOX_METRICS_PORT`` (``--metrics-port``);
0, the default, serves nothing. docs/operations.md lists every metric.
"""

from __future__ import annotations

import structlog
from prometheus_client import start_http_server


def serve_metrics(port: int, *, addr: str = "0.0.0.0") -> None:
    """Serve the default Prometheus registry on ``port`` in a daemon thread (0: do nothing)."""
    if port <= 0:
        return
    start_http_server(port, addr=addr)
    structlog.get_logger().info("metrics_serving", port=port)
