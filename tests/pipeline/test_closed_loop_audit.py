"""The closed loop when nothing is to be mitigated, or the set has no test
split: said, recorded and shown, never silent (SPEC §4.2)."""
from __future__ import annotations

import json

import pyarrow.compute as pc

from ravl_pipeline.config import MitigationConfig, Params
from ravl_pipeline.core.findings import Findings, write_findings
from ravl_pipeline.experiments.synth import SynthConfig, make_setting
from ravl_pipeline.io.manifest import read_manifest, write_manifest
from ravl_pipeline.pipeline.audit import Audit, ModelRecord


def _audit_without_test_split(tmp_path) -> Audit:
    make_setting(tmp_path / "s", SynthConfig(classes=["one", "nine"], n_pretrain=4, n_finetune=4, n_val=12,
                                             n_test=8, seed=3))
    data = tmp_path / "s" / "eval"
    table = read_manifest(data)
    write_manifest(data, table.filter(pc.equal(table.column("split"), "val")))
    out = tmp_path / "out"
    ModelRecord(model="ravl-tiny-rn", init_model="ravl-tiny-rn",
                train_data=str(tmp_path / "s" / "finetune")).write(tmp_path / "audited_model.json")
    write_findings(Findings(model="ravl-tiny-rn", dataset=str(data), classes=["one", "nine"], k=2, silhouette=0.1,
                            features=[]), out / "findings.json")
    return Audit("s", data, out, Params(), tmp_path / "audited_model.json", progress=False)


def test_nothing_to_mitigate_trains_nothing_and_the_report_shows_only_the_audited_model(tmp_path, capsys):
    audit = _audit_without_test_split(tmp_path)
    record, history = audit.mitigate()
    assert record.extra["trained"] is False and history == {} and "nothing to mitigate" in record.extra["reason"]
    control, _ = audit.train_control()
    assert control.extra["trained"] is False
    assert audit.reaudit() is None and not audit.paths.findings_mitigated.exists()

    metrics = audit.measure()
    # no test split: the metrics are on the discovery rows, and say so
    assert metrics["split"] is None or metrics["split"] == "val"
    assert any("no 'test' split" in w for w in metrics["warnings"])
    assert "no 'test' split" in capsys.readouterr().err
    # one evaluation, of the audited model; none of the same model under another name
    assert metrics["mitigated"] is None and metrics["control"] is None and metrics["comparisons"] == {}
    assert "nothing to mitigate" in metrics["not_trained"]["mitigated"]
    assert metrics["groups_from"] == "annotation" and metrics["steps"]["mitigated"] is None

    summary = audit.report()
    assert summary["after"] is None
    twin = json.loads((audit.paths.report / "report.json").read_text())
    assert list(twin["metrics"]) == ["audited"]
    page = (audit.paths.report / "report.html").read_text()
    assert "ravl" not in page.split('id="metrics"')[1].split("</section>")[0]
    headline = json.loads(audit.paths.headline.read_text())
    # the model the loop ends with is the audited one, and the headline says it was not trained
    assert headline["mitigated"] == headline["audited"] and headline["mitigated_trained"] is False
    assert headline["audited"]["image_overall"] is not None and headline["control"]["image_overall"] is None


def test_the_control_says_why_it_was_not_trained(tmp_path):
    audit = _audit_without_test_split(tmp_path)
    for mitigation, why in ((MitigationConfig(control=False), "mitigation.control: false"),
                            (MitigationConfig(method="upsampled"), "the control itself"),
                            (MitigationConfig(method="vl-erm"), "uses no findings"),
                            (MitigationConfig(), "nothing to mitigate")):
        audit = Audit("s", audit.dataset_dir, audit.out, Params(mitigation=mitigation), audit.record_path,
                      progress=False)
        record, history = audit.train_control()
        assert record.extra["trained"] is False and history == {} and why in record.extra["reason"]
        assert json.loads(audit.paths.control_record.read_text())["reason"] == record.extra["reason"]


def test_the_prompt_resolves_flag_then_checkpoint_then_setting_then_default(tmp_path):
    from ravl_pipeline.config import DEFAULT_TEMPLATES, ScoresConfig
    from ravl_pipeline.experiments.synth import CAPTION_TEMPLATE
    from ravl_pipeline.pipeline.stages import templates_for

    make_setting(tmp_path / "s", SynthConfig(classes=["one", "nine"], n_pretrain=4, n_finetune=4, n_val=4,
                                             n_test=4, seed=3))
    data = tmp_path / "s" / "eval"
    recorded = {"caption_template": "a photo of the digit {}."}
    assert templates_for(data, ScoresConfig(templates=["a {} sign"]), recorded) == ["a {} sign"]
    assert templates_for(data, ScoresConfig(), recorded) == ["a photo of the digit {}."]
    assert templates_for(data, ScoresConfig(), {"epochs": 4}) == [CAPTION_TEMPLATE]  # the setting's
    (tmp_path / "s" / "setting.json").unlink()
    assert templates_for(data) == list(DEFAULT_TEMPLATES)
    # an audit resolves it once, from its audited model's record
    ModelRecord(model="ravl-tiny-rn", train=recorded).write(tmp_path / "audited_model.json")
    audit = Audit("s", data, tmp_path / "out", Params(), tmp_path / "audited_model.json", progress=False)
    assert audit.templates == ["a photo of the digit {}."]
