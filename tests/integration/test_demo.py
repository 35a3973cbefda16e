"""The demo end to end: real processes, every example saga on its success and its
compensation path, and the consistency check read from each service's database."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from sagabox.demo import Demo
from tests import servers

pytestmark = pytest.mark.integration


def test_the_demo_runs_every_example_saga_and_its_checks_hold(
    services: None, tmp_path: Path
) -> None:
    lines: list[str] = []
    demo = Demo(
        admin_url=servers.PG_ADMIN_URL,
        prefix=f"sagabox_test_demo_{uuid.uuid4().hex[:8]}",
        say=lines.append,
        log_dir=tmp_path / "logs",
        timeout=90,
    )
    try:
        code = demo.run()
    finally:
        demo.drop()
    report = "\n".join(lines)
    assert code == 0, report
    assert "all checks hold" in report
    assert report.count("[ok]") == 22 and "UNEXPECTED" not in report
    # The processes `sagabox up` runs, one of each, named as it names them.
    for name in ("relay", "orchestrator", "inventory", "payment", "shipping", "loyalty"):
        log = (tmp_path / "logs" / f"{name}-1.log").read_text()
        assert log, f"{name} wrote no log"
    # authorize_payment v2: the payment service handled its slip's next steps itself.
    payment = (tmp_path / "logs" / "payment-1.log").read_text()
    assert '"next_step":"risk"' in payment.replace(" ", "")
    assert '"local":true' in payment.replace(" ", "")
