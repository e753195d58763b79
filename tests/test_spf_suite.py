"""The official RFC 7208 test suite (openspf.org, as shipped with pyspf) against pymta.spf.

Each scenario's zone data is loaded into a fake resolver (tests/spfzone.py)
and every test's result is asserted; where the suite lists alternatives
(``result: [a, b]``) any of them passes.  An expected explanation is compared
exactly; the suite's driver uses "DEFAULT" for "no exp= explanation".
``test_suite_summary`` prints and checks the passed/total count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pymta.spf import SPFChecker, identity
from spfzone import ZoneResolver, fired, load_zone

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"


def _load() -> list[tuple[str, dict, dict]]:
    cases = []
    with open(SUITE, "rb") as f:
        for scenario in yaml.safe_load_all(f):
            zone = load_zone(scenario.get("zonedata"))
            for name, test in scenario["tests"].items():
                cases.append((f"{scenario['description']}: {name}", zone, test))
    return cases


CASES = _load()


def run_case(zone: dict, test: dict):
    sender, domain = identity(test["mailfrom"], test["helo"])
    checker = SPFChecker(ZoneResolver(zone), receiver=test.get("receiver", "receiver.example"))
    return fired(checker.check_host(str(test["host"]), domain, sender, test["helo"]))


def _verdict(zone: dict, test: dict) -> str | None:
    """None when the case passes, else what was wrong."""
    result = run_case(zone, test)
    expected = test["result"]
    allowed = expected if isinstance(expected, list) else [expected]
    if result.result not in allowed:
        return f"result {result.result!r} ({result.problem}), expected {expected!r}"
    if "explanation" in test:
        got = result.explanation if result.explanation is not None else "DEFAULT"
        if got != test["explanation"]:
            return f"explanation {got!r}, expected {test['explanation']!r}"
    return None


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rfc7208_case(case):
    _name, zone, test = case
    problem = _verdict(zone, test)
    assert problem is None, f"{test.get('spec')}: {problem}"


def test_suite_summary(capsys):
    failed = [name for name, zone, test in CASES if _verdict(zone, test) is not None]
    total = len(CASES)
    with capsys.disabled():
        print(f"\nRFC 7208 test suite: {total - len(failed)}/{total} passed")
    assert total == 203, "the suite file changed"
    assert failed == []
