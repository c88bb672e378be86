"""`capsbench all` writes a self-contained report, check flags regressions, a missing run is a clear error.

The page itself (browser rendering, chart geometry, numbers) is tested on checked-in JSON: test_report_page.py.
"""

import json
import re
import shutil
from pathlib import Path

from capsbench.reports.render import render_report
from capsbench.suite.cli import main


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_report_exists_and_is_self_contained(smoke_all_run):
    html = (smoke_all_run / "report.html").read_text()
    assert "<svg" in html and "<style>" in html
    # No external resources: no src/href to anything but in-page anchors, no @import, no url(http...).
    assert not re.search(r'(src|href)="(?!#)', html)
    assert "@import" not in html and "url(http" not in html


def test_check_passes_against_itself_and_fails_on_a_doctored_baseline(smoke_all_run, tmp_path, capsys):
    assert main(["check", str(smoke_all_run), "--baseline", str(smoke_all_run)]) == 0
    baseline = tmp_path / "baseline"
    shutil.copytree(smoke_all_run, baseline)
    cfg = next(d for d in baseline.iterdir() if (d / "metrics.json").is_file())
    metrics = _json(cfg / "metrics.json")
    metrics["test_accuracy"] += 0.05  # the baseline was better
    (cfg / "metrics.json").write_text(json.dumps(metrics))
    latency = _json(cfg / "latency.json")
    for r in latency["rows"]:
        if str(r.get("backend", "")).startswith("ort") and r.get("p50_ms"):
            r["p50_ms"] /= 3  # ... and its ONNX Runtime three times faster relative to torch eager
    (cfg / "latency.json").write_text(json.dumps(latency))
    capsys.readouterr()
    assert main(["check", str(smoke_all_run), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert f"REGRESSED {cfg.name} test_accuracy" in out
    assert "speedup_vs_eager" in out

    report = render_report(smoke_all_run, tmp_path / "with_baseline.html", baseline)
    assert "Regressions against the baseline" in report.read_text() and "regressed" in report.read_text()


def test_report_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
