"""The Prometheus rules pass promtool's checks and its unit tests (tests/deploy/rules_test.yaml:
alerts fire on the series that should fire them; recording rules compute the right values)."""

from __future__ import annotations

import subprocess

from tests.deploy.conftest import CHART, ROOT

RULES = CHART / "rules" / "orchestrator.rules.yaml"


def test_promtool_check_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_of_the_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "test", "rules", "rules_test.yaml"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT / "tests" / "deploy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The check is not vacuous: a typo in an expression fails it."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES.read_text().replace("rate(orchestrator_http_requests_total[5m])",
                                                "rate(orchestrator_http_requests_total[5m]", 1))
    proc = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
