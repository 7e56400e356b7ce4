"""Every fault test that records findings belongs to a class of the README's Reliability table."""

from __future__ import annotations

import ast

from reliability_table import CLASSES

from helpers import FAULTS


def test_every_fault_test_with_findings_has_a_class():
    classified = {test for tests in CLASSES.values() for test in tests}
    found = set()
    for path in sorted(FAULTS.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and "finding" in {a.arg for a in node.args.args}:
                found.add(f"{path.name}::{node.name}")
    assert found, "no fault test records findings"
    assert found - classified == set(), "add these to tests/faults/reliability_table.py CLASSES"
    assert classified - found == set(), "CLASSES names tests that do not exist (or record no findings)"
