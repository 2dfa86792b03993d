"""How `ravl demo` reads the outcome of its runs."""
from __future__ import annotations

from ravl_pipeline.cli.dagster_runs import RunSummary
from ravl_pipeline.cli.demo import only_mitigation_check_failed

MITIGATION = "mitigation_metrics:mitigated_accuracy_within_margin"
FINDINGS = "spurious_features:findings_well_formed"


def run(success, checks):
    return RunSummary("r", "set", success, [], checks)


def test_a_rejected_mitigated_model_is_a_demo_outcome_not_a_crash():
    assert only_mitigation_check_failed([run(True, []), run(False, [(MITIGATION, False, "ERROR"),
                                                                    (FINDINGS, True, "ERROR")])])


def test_any_other_failure_still_fails_the_demo():
    assert not only_mitigation_check_failed([run(False, [(FINDINGS, False, "ERROR")])])
    assert not only_mitigation_check_failed([run(False, [(MITIGATION, False, "ERROR")]),
                                             run(False, [(FINDINGS, False, "ERROR")])])
    # a step that failed without any failed check (an exception) is a real failure
    assert not only_mitigation_check_failed([run(False, [])])
    assert not only_mitigation_check_failed([run(True, [])])  # nothing failed at all
