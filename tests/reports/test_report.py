"""The HTML report of a real `capsbench all --preset smoke` run: numbers match the JSON files, it renders in a
real headless browser (Debian's chromium) with no console errors and no requests, and check flags regressions.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from capsbench.reports.render import render_report
from capsbench.suite.cli import main

ARTIFACTS = Path(os.environ.get("CAPSBENCH_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_report_exists_and_is_self_contained(smoke_all_run):
    html = (smoke_all_run / "report.html").read_text()
    assert "<svg" in html and "<style>" in html
    # No external resources: no src/href to anything but in-page anchors, no @import, no url(http...).
    assert not re.search(r'(src|href)="(?!#)', html)
    assert "@import" not in html and "url(http" not in html


def test_report_numbers_match_the_result_files(smoke_all_run):
    html = (smoke_all_run / "report.html").read_text()
    configs = [d for d in smoke_all_run.iterdir() if (d / "metrics.json").is_file()]
    assert len(configs) == 2
    for d in configs:
        metrics = _json(d / "metrics.json")
        row = re.search(rf"<tr><td class=\"l\"><code>{d.name}</code></td>.*?</tr>", html, re.S).group(0)
        assert f"{100 * metrics['test_accuracy']:.2f}" in row
        health = _json(d / "health.json")
        assert " ".join(f"{x['inactive']}/{x['num_capsules']}" for x in health["layers"]) in row
        prune = _json(next(d.glob("prune_*/prune.json")))
        assert f"{100 * prune['summary']['test_accuracy']['after_finetune']:.2f}" in row
        latency = _json(d / "latency.json")
        for r in latency["rows"]:
            if r.get("p50_ms"):
                assert f"{r['p50_ms']:.3g}" in html


def test_report_renders_in_headless_chromium_without_errors_or_requests(smoke_all_run):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: scripts/install.sh installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = (smoke_all_run / "report.html").resolve().as_uri()
    console, requests, page_errors = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: console.append((m.type, m.text)))
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        sections = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
        svgs = page.locator("svg").count()
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert [m for m in console if m[0] in ("error", "warning")] == []
    assert page_errors == []
    assert requests == [url]
    assert set(sections) >= {
        "summary",
        "configs",
        "depth",
        "health",
        "pruning",
        "latency",
        "paper",
        "environment",
    }
    assert svgs >= 6
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


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
