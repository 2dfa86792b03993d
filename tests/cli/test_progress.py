"""What ``ravl materialize`` and ``ravl demo`` print while and after they run:
a running step named again when the output is a file, and check outcomes in
words (passed, warning, failed and what it blocks)."""
from __future__ import annotations

import io
import time

import dagster as dg

from ravl_pipeline.cli.dagster_runs import RunSummary, check_word
from ravl_pipeline.cli.progress import HEARTBEAT_S, StepProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_step_is_named_again_when_the_output_is_not_a_terminal():
    with dg.instance_for_test() as instance:
        to_file, to_terminal = StepProgress(instance, out=io.StringIO()), StepProgress(instance, out=_Tty())
        assert to_file.heartbeat == HEARTBEAT_S <= 30 and to_terminal.heartbeat is None
        to_file._partitions["r1"] = "set-a"
        to_file._started[("r1", "mitigated_model")] = time.time() - 95
        to_file.beat()
        assert to_file.out.getvalue() == "  [set-a] mitigated_model still running (95s)\n"
        quick = StepProgress(instance, out=io.StringIO(), interval=0.01, heartbeat=0.05)
        quick._started[("r2", "audited_model")] = time.time()
        with quick:
            time.sleep(0.3)
        assert "audited_model still running" in quick.out.getvalue()


def test_check_lines_say_passed_warning_or_what_a_failure_blocks():
    assert check_word(True, "ERROR") == check_word(True, "WARN") == "passed"
    assert check_word(False, "WARN") == "warning"
    assert check_word(False, "ERROR") == "failed (blocks the steps after it)"
    run = RunSummary(run_id="abcdef123", partition="set-a", success=False,
                     checks=[("mitigation_metrics:mitigated_accuracy_within_margin", False, "ERROR"),
                             ("spurious_features:no_new_called_finding", True, "WARN")])
    lines = run.lines()
    assert "  check mitigation_metrics:mitigated_accuracy_within_margin: failed (blocks the steps after it)" in lines
    assert "  check spurious_features:no_new_called_finding: passed" in lines
