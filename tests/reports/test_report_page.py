"""The HTML report of the checked-in smoke run (tests/reports/data/smoke: the JSON files of a real
`capsbench all --preset smoke`, no checkpoints or ONNX): it is one self-contained page that renders in a real
headless Chromium with no errors or requests, every chart's data markers lie inside their axes, and the numbers
on the page are those of the JSON files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from capsbench.reports.render import render_report

DATA = Path(__file__).parent / "data" / "smoke"
ARTIFACTS = Path(os.environ.get("CAPSBENCH_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECTIONS = {"header", "claims", "configs", "depth", "accuracy", "pruning", "latency", "paper", "environment"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _si(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


@pytest.fixture
def run_copy(tmp_path) -> Path:
    run = tmp_path / "smoke"
    shutil.copytree(DATA, run)
    return run


def _configs(run: Path) -> list[Path]:
    return sorted(d for d in run.iterdir() if (d / "metrics.json").is_file())


@pytest.fixture(scope="module")
def page():
    """The smoke report opened in headless Chromium, with what the browser logged and requested."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("chromium is not installed: scripts/install.sh installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    out = ARTIFACTS / "report-smoke.html"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    render_report(DATA, out)
    url = out.resolve().as_uri()
    log = {"console": [], "requests": [], "errors": [], "url": url}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.on("console", lambda m: log["console"].append((m.type, m.text)))
        pg.on("pageerror", lambda e: log["errors"].append(str(e)))
        pg.on("request", lambda r: log["requests"].append(r.url))
        pg.goto(url)
        pg.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        yield pg, log
        browser.close()


@pytest.mark.slow
def test_report_is_one_self_contained_file(run_copy):
    html = render_report(run_copy).read_text()
    assert html.count("<svg") >= 5 and "<style>" in html
    # Nothing fetched: no src/href but in-page anchors, no @import, no url() but in-page ones (clip paths), no script, no XML prologue.
    assert not re.search(r'(src|href)="(?!#)', html)
    assert "@import" not in html and not re.search(r"url\((?!#)", html)
    assert "<script" not in html and "<?xml" not in html
    # Text kept as text in the charts (svg.fonttype none): axis labels are readable strings, not glyph paths.
    assert "mean capsule length (log)" in html and "<text" in html


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_errors_or_requests(page):
    pg, log = page
    assert [m for m in log["console"] if m[0] in ("error", "warning")] == []
    assert log["errors"] == []
    assert log["requests"] == [log["url"]]
    assert set(pg.eval_on_selector_all("section", "els => els.map(e => e.id)")) >= SECTIONS
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000


# Per chart: the screen rectangle of each axes and the centre of each data marker (an SVG <use> inside a group
# whose id is data-CHART-aN-sM), so a marker drawn outside its axes (clipped or not) fails the test.
_GEOMETRY = """() => [...document.querySelectorAll('svg.chart')].map(svg => {
  const axes = {};
  svg.querySelectorAll('[id^="axes-"]').forEach(g => {
    const r = g.querySelector('path').getBoundingClientRect();
    axes[g.id.split('-').pop()] = [r.left, r.top, r.right, r.bottom];
  });
  const series = [...svg.querySelectorAll('[id^="data-"]')].map(g => ({
    id: g.id,
    axes: g.id.split('-').slice(-2)[0],
    points: [...g.querySelectorAll('use')].map(u => {
      const r = u.getBoundingClientRect();
      return [(r.left + r.right) / 2, (r.top + r.bottom) / 2];
    }),
  }));
  return {figure: svg.closest('figure').id, axes, series};
})"""


def test_every_data_marker_lies_inside_its_axes(page):
    pg, _ = page
    charts = pg.evaluate(_GEOMETRY)
    figures = {c["figure"] for c in charts}
    assert {"depth-profile-0", "accuracy-depth", "pareto", "latency-0", "latency-1"} <= figures
    for chart in charts:
        assert chart["series"], f"{chart['figure']}: no data series found"
        for s in chart["series"]:
            assert s["points"], f"{s['id']}: no markers"
            left, top, right, bottom = chart["axes"][s["axes"]]
            for x, y in s["points"]:
                assert left - 0.5 <= x <= right + 0.5 and top - 0.5 <= y <= bottom + 0.5, (
                    f"{s['id']}: marker at ({x:.1f}, {y:.1f}) outside its axes {chart['axes'][s['axes']]}"
                )


def test_depth_profile_draws_each_layers_mean_length_in_order(page):
    """The deep net's mean capsule length falls 0.99 -> 0.48 -> 0.32 -> 0.22 through its layers: the markers of
    its unpruned line must sit at those heights on the log axis (screen y grows downwards)."""
    pg, _ = page
    chart = next(c for c in pg.evaluate(_GEOMETRY) if c["figure"] == "depth-profile-0")
    deep = next(d for d in _configs(DATA) if _json(d / "config.json")["config"]["model"]["intermediate"])
    lengths = [x["mean_length"] for x in _json(deep / "health.json")["layers"]]
    series = [s for s in chart["series"] if s["axes"] == "a0" and len(s["points"]) == len(lengths)]
    ys = [y for _, y in series[0]["points"]]  # the first 5-layer series drawn is the deep net, unpruned
    assert sorted(range(len(ys)), key=lambda i: ys[i]) == sorted(
        range(len(lengths)), key=lambda i: -lengths[i]
    )
    # Log scale: equal length ratios are equal screen distances.
    import math

    scale = (ys[-1] - ys[0]) / (math.log(lengths[-1]) - math.log(lengths[0]))
    for y, length in zip(ys, lengths, strict=True):
        assert y == pytest.approx(ys[0] + scale * (math.log(length) - math.log(lengths[0])), abs=1.0)


def _text(pg, selector: str) -> str:
    return pg.locator(selector).first.inner_text().strip()


@pytest.mark.slow
def test_numbers_on_the_page_equal_the_result_files(page):
    pg, _ = page
    run = _json(DATA / "run.json")
    env = run["environment"]
    assert _text(pg, "#h-preset") == run["preset"]
    assert _text(pg, "#h-device") == f"CPU: {env['cpu']}, {env['cpu_threads']} threads"
    assert _text(pg, "#h-commit") == env["git_commit"]
    assert "CPUExecutionProvider (Python)" in _text(pg, "#h-providers")
    assert "CPUExecutionProvider (C++)" in _text(pg, "#h-providers")
    for d in _configs(DATA):
        metrics, health = _json(d / "metrics.json"), _json(d / "health.json")
        prune_dir = next(d.glob("prune_*"))
        prune = _json(prune_dir / "prune.json")
        latency, cpp = _json(d / "latency.json"), _json(d / "latency_cpp.json")
        row = f"#cfg-{d.name}"
        assert _text(pg, f"{row} td.acc") == f"{100 * metrics['test_accuracy']:.2f}"
        assert (
            _text(pg, f"{row} td.pacc") == f"{100 * prune['summary']['test_accuracy']['after_finetune']:.2f}"
        )
        # Depth profile table: every layer's mean length.
        depth_row = pg.locator("#depth-table tr", has=pg.locator(f"code:text-is('{d.name}')")).first
        for layer in health["layers"]:
            cell = depth_row.locator(f"span.layer[data-name='{layer['name']}'] b").inner_text()
            assert cell == f"{layer['mean_length']:.3g}"
        # Pruning at a glance: parent and pruned rows; MACs from prune.json, FLOPs from latency.json.
        parent = pg.locator(f"#pruning-table tr[data-config='{d.name}'][data-variant='unpruned']")
        child = pg.locator(f"#pruning-table tr[data-config='{d.name}'][data-variant='pruned']")
        cells = [t.strip() for t in parent.locator("td").all_inner_texts()]
        assert cells[5] == _si(prune["summary"]["parameters"]["before"])
        assert cells[6] == _si(prune["summary"]["flops"]["before"])  # MACs
        assert cells[7] == _si(latency["flops_per_image"]["model"])  # FLOPs
        child_cells = [t.split("\n")[0].strip() for t in child.locator("td").all_inner_texts()]
        assert child_cells[2] == f"{100 * prune['summary']['test_accuracy']['after_finetune']:.2f}"
        assert child_cells[6] == _si(prune["summary"]["flops"]["after"])
        assert child_cells[7] == _si(latency["flops_per_image"][prune["folder"]])
        before, after = prune["summary"]["parameters"]["before"], prune["summary"]["parameters"]["after"]
        assert f"{100 * (after - before) / before:+.1f}%" in child.locator("td").nth(5).inner_text()
        # Latency: every timed row's p50, Python ORT, C++ ORT and torch eager in their own columns.
        for r in latency["rows"] + cpp["rows"]:
            if not r.get("p50_ms"):
                continue
            table = f"table.latency[data-config='{d.name}'][data-variant='{r['variant']}']"
            cell = f"{table} tr[data-batch='{r['batch']}'] td.p50[data-backend='{r['backend']}']"
            assert _text(pg, cell) == f"{r['p50_ms']:.3g}", cell
            spread, ips = (pg.locator(cell).locator(f"xpath=following-sibling::td[{i}]") for i in (1, 2))
            assert spread.inner_text().strip() == f"{r['min_ms']:.3g} / {r['p90_ms']:.3g}", cell
            assert ips.inner_text().strip() == f"{r['throughput_ips']:.0f}", cell


@pytest.mark.slow
def test_without_verdicts_no_claim_is_said_to_fail(run_copy):
    html = render_report(run_copy).read_text()
    claims = re.search(r'<section id="claims">.*?</section>', html, re.S).group(0)
    assert 'class="l did-not-hold"' not in claims and 'class="l held"' not in claims
    # Two depths and pruned models: the run speaks to these, without a test ...
    assert claims.count('class="l inconclusive"') == 3
    # ... but no unpruned model has an inactive capsule, so "pruning leaves fewer" cannot be tested, and with one
    # capsule dimension neither can claim (b).
    assert claims.count('class="l not-testable"') == 2
    assert "no verdicts.json" in claims
    assert "Caution: 1 seed(s) per configuration" in html
    # The budget behind every verdict is named (this older run's configs leave the legacy fan_in init out).
    assert "this run's nets and budget only: fan_in init, 2 epoch(s) on 12000 training images" in claims


@pytest.mark.slow
def test_verdicts_json_is_shown_with_its_test_and_numbers(run_copy):
    verdict = {
        "claim": "deeper_more_inactive",
        "verdict": "did not hold",
        "test": "one-sided Mann-Whitney U",
        "n": 12,
        "effect": 0.0312,
        "effect_name": "difference in inactive fraction",
        "interval": [-0.0123, 0.0747],
        "interval_level": 0.95,
        "p_value": 0.41,
    }
    (run_copy / "verdicts.json").write_text(
        json.dumps({"schema_version": 1, "kind": "verdicts", "verdicts": [verdict]})
    )
    html = render_report(run_copy).read_text()
    row = re.search(r"<tr><td class=\"l\">Deeper capsule layers.*?</tr>", html, re.S).group(0)
    assert 'class="l did-not-hold">did not hold<' in row
    for text in ("one-sided Mann-Whitney U", ">12<", "0.0312", "[-0.0123, 0.0747]", "95%", ">0.41<"):
        assert text in row, text
    assert 'href="#depth-profile"' in row


@pytest.mark.slow
def test_failed_and_missing_stages_are_shown_per_config(run_copy):
    first, second = _configs(run_copy)
    (first / "latency_cpp.json").unlink()
    pipeline = _json(second / "pipeline.json")
    pipeline["export"] = {"status": "failed", "error": "StageError: parity failed", "seconds": 1.0}
    pipeline["status"] = "failed"
    (second / "pipeline.json").write_text(json.dumps(pipeline))
    html = render_report(run_copy).read_text()
    stages = re.search(r'<table id="stages">.*?</table>', html, re.S).group(0)
    row1 = re.search(rf"<code>{first.name}</code>.*?</tr>", stages, re.S).group(0)
    row2 = re.search(rf"<code>{second.name}</code>.*?</tr>", stages, re.S).group(0)
    assert 'class="l missing">missing: latency_cpp.json<' in row1
    assert 'class="l failed">failed: StageError: parity failed<' in row2


@pytest.mark.slow
def test_timing_spread_and_stability_shown_when_recorded_else_na(run_copy):
    d = _configs(run_copy)[0]
    latency = _json(d / "latency.json")
    for r in latency["rows"]:
        if r["backend"] == "torch_eager" and r["variant"] == "model" and r["batch"] == 8:
            r["stable"], r["spread"] = False, 0.437
    (d / "latency.json").write_text(json.dumps(latency))
    html = render_report(run_copy).read_text()
    table = re.search(
        rf"<table class=\"latency\" data-config=\"{d.name}\" data-variant=\"model\">.*?</table>", html, re.S
    )
    row = re.search(r'<tr data-batch="8">.*?</tr>', table.group(0), re.S).group(0)
    assert 'class="l unstable">unstable <small>(spread 0.437)</small>' in row
    assert 'class="l n/a">n/a' in row  # the other backends carry no verdict


@pytest.mark.slow
def test_controls_appear_beside_their_parent(run_copy):
    """A pruning result marked as a control (a `control` field) is drawn and listed under its own name."""
    d = next(d for d in _configs(run_copy) if _json(d / "config.json")["config"]["model"]["intermediate"])
    src = next(d.glob("prune_*"))
    dst = d / "prune_random_b0.25_c0.25"
    shutil.copytree(src, dst)
    prune = _json(dst / "prune.json")
    prune["control"], prune["folder"] = "random", dst.name
    prune["summary"]["test_accuracy"]["after_finetune"] = 0.7123
    (dst / "prune.json").write_text(json.dumps(prune))
    html = render_report(run_copy).read_text()
    row = re.search(rf'<tr class="child" data-config="{d.name}" data-variant="random">.*?</tr>', html, re.S)
    assert row and "71.23" in row.group(0)
    assert "3 caps layers, random" in html  # the depth profile's legend
    # The main row still shows the method under test, not the control.
    assert re.search(rf'<tr id="cfg-{d.name}">.*?<td class="pacc">(.*?)</td>', html, re.S).group(1) == (
        f"{100 * _json(src / 'prune.json')['summary']['test_accuracy']['after_finetune']:.2f}"
    )


@pytest.mark.slow
def test_configs_that_differ_only_by_seed_are_drawn_as_mean_and_spread(run_copy):
    deep = next(d for d in _configs(run_copy) if _json(d / "config.json")["config"]["model"]["intermediate"])
    twin = run_copy / "0000000000"
    shutil.copytree(deep, twin)
    config = _json(twin / "config.json")
    config["config_id"], config["config"]["seed"] = twin.name, 1
    config["label"] = config["label"].replace("| seed 0", "| seed 1")
    (twin / "config.json").write_text(json.dumps(config))
    metrics = _json(twin / "metrics.json")
    metrics["test_accuracy"] = 0.8000
    (twin / "metrics.json").write_text(json.dumps(metrics))
    html = render_report(run_copy).read_text()
    mean = (0.8000 + _json(deep / "metrics.json")["test_accuracy"]) / 2
    assert f"{100 * mean:.2f}" in re.search(r"<h3>Mean ± std over seeds</h3>.*?</table>", html, re.S).group(0)
    # The accuracy chart gets error bars, the depth profile a band, both in groups a test can find.
    assert 'id="spread-accuracy-depth-a0-s' in html
    assert 'id="spread-depth-profile-0-a0-s' in html
    assert "Lines are the mean over 2 seeds" in html
    assert "seeds" in html and ">0, 1<" in html


def test_a_train_only_run_renders_and_says_what_is_missing(run_copy):
    """`capsbench train` alone leaves config, metrics and health: the page renders and names what is absent."""
    for d in _configs(run_copy):
        for path in sorted(d.rglob("*"), reverse=True):
            if path.is_file() and path.name not in ("config.json", "metrics.json", "health.json"):
                path.unlink()
            elif path.is_dir():
                path.rmdir()
    html = render_report(run_copy).read_text()
    assert "No pruning results in this run" in html and "No latency results in this run" in html
    assert 'class="l missing">missing: latency.json<' in html
    assert "no pipeline.json" in html
    assert 'id="depth-profile-0"' in html and 'id="accuracy-depth"' in html


@pytest.mark.slow
def test_a_gpu_run_names_its_gpu_in_the_header(run_copy):
    run = _json(run_copy / "run.json")
    run["environment"].update(device="cuda:0", cuda_available=True, gpu="NVIDIA H100 80GB HBM3")
    (run_copy / "run.json").write_text(json.dumps(run))
    html = render_report(run_copy).read_text()
    assert '<dd id="h-device">GPU: NVIDIA H100 80GB HBM3</dd>' in html


@pytest.mark.slow
def test_capsbench_report_shows_regressions_against_a_doctored_baseline(run_copy, tmp_path, capsys):
    from capsbench.suite.cli import main

    baseline = tmp_path / "baseline"
    shutil.copytree(DATA, baseline)
    cfg = _configs(baseline)[0]
    metrics = _json(cfg / "metrics.json")
    metrics["test_accuracy"] += 0.05  # the baseline was better
    (cfg / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "page.html"
    assert main(["report", str(run_copy), "--baseline", str(baseline), "--output", str(out)]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    section = re.search(r'<section id="regressions">.*?</section>', out.read_text(), re.S).group(0)
    row = re.search(
        rf'<tr class="regressed"><td class="l"><code>{cfg.name}</code></td><td class="l">test_accuracy.*?</tr>',
        section,
        re.S,
    )
    assert row, section[:2000]


@pytest.mark.slow
def test_a_stage_never_run_for_a_config_is_not_run_not_missing(run_copy):
    """A preset that times only its first configs leaves the others without timing: that is no lost file."""
    first, second = _configs(run_copy)
    for d in (first, second):
        (d / "latency_cpp.json").unlink()
    pipeline = _json(second / "pipeline.json")
    del pipeline["cpp"]  # the cpp stage never ran for the second config
    (second / "pipeline.json").write_text(json.dumps(pipeline))
    stages = re.search(r'<table id="stages">.*?</table>', render_report(run_copy).read_text(), re.S).group(0)
    row1 = re.search(rf"<code>{first.name}</code>.*?</tr>", stages, re.S).group(0)
    row2 = re.search(rf"<code>{second.name}</code>.*?</tr>", stages, re.S).group(0)
    assert 'class="l missing">missing: latency_cpp.json<' in row1  # it ran: its file was lost
    assert 'class="l na">not run<' in row2 and "missing" not in row2
