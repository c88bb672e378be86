"""The end-of-run summary table of `capsbench all` and `capsbench train` (suite/cli/summary.py): every value equal to
its JSON source, on the checked-in smoke run folder; unstable timings marked, missing results shown as dashes, and
labels with terminal escapes printed escaped."""

import json
import shutil
from pathlib import Path

import pytest

from capsbench.suite.cli.summary import COLUMNS, format_summary, summary_rows

SMOKE_RUN = Path(__file__).parents[2] / "reports" / "data" / "smoke"


@pytest.fixture
def run(tmp_path) -> Path:
    return Path(shutil.copytree(SMOKE_RUN, tmp_path / "smoke"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _table(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The two header lines joined per column, and every body line cut into its columns by their widths."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})

    def cut(line: str) -> dict[str, str]:
        cells, pos = {}, 0
        for key, _, width, _ in COLUMNS:
            cells[key] = (line[pos : pos + width] if width else line[pos:]).strip()
            pos += width + 1
        return cells

    headers = [" ".join(filter(None, (cut(h)[k] for h in lines[:rule]))) for k, *_ in COLUMNS]
    return headers, [cut(line) for line in lines[rule + 1 :]]


def _ort_row(latency: dict, variant: str) -> tuple[dict, dict]:
    """Python ORT's row at the smallest batch of `variant` and torch eager's at that batch, from latency.json."""
    ort = [r for r in latency["rows"] if r["variant"] == variant and r["backend"].startswith("ort")]
    b = min(r["batch"] for r in ort)
    eager = next(
        r
        for r in latency["rows"]
        if r["variant"] == variant and r["backend"] == "torch_eager" and r["batch"] == b
    )
    return next(r for r in ort if r["batch"] == b), eager


def test_summary_names_every_column_and_shows_the_values_of_the_result_files(run):
    headers, rows = _table(format_summary(summary_rows(run), legend=False))
    assert all(headers), headers  # the label column too
    assert "test acc %" in headers and "routed inact. %" in headers and "ORT p50 ms" in headers
    assert not any(h.startswith("pruned %") for h in headers)

    configs = [c["config_id"] for c in _load(run / "run.json")["configs"]]
    expected = []
    for cfg_id in configs:
        d = run / cfg_id
        latency = _load(d / "latency.json")
        variants = [
            ("model", "trained", _load(d / "metrics.json")["test_accuracy"], _load(d / "health.json"))
        ]
        for p in sorted(d.glob("prune_*/prune.json")):
            prune = _load(p)
            s = prune["settings"]
            variants.append(
                (
                    p.parent.name,
                    f"pruned {s['criterion']} b{s['backbone_ratio']:.2f} c{s['caps_ratio']:.2f}",
                    prune["summary"]["test_accuracy"]["after_finetune"],
                    _load(p.parent / "health_pruned.json"),
                )
            )
        for variant, model, acc, health in variants:
            ort, eager = _ort_row(latency, variant)
            expected.append(
                {
                    "model": model,
                    "accuracy": f"{100 * acc:.2f}",
                    "routed_inactive": f"{100 * health['routed_inactive_fraction']:.2f}",
                    "deepest_length": f"{health['layers'][-1]['mean_length']:.3g}",
                    "batch": str(ort["batch"]),
                    "ort_p50_ms": f"{ort['p50_ms']:.3f}",
                    "speedup": f"{eager['p50_ms'] / ort['p50_ms']:.2f}x",
                }
            )
    assert len(rows) == len(expected) == 4  # two configs, each trained and pruned once
    for row, want in zip(rows, expected, strict=True):
        assert {k: row[k] for k in want} == want
    labels = [r["label"] for r in rows if r["label"]]
    assert labels == [c["label"] for c in _load(run / "run.json")["configs"]]
    assert [r["config_id"] for r in rows if r["config_id"]] == configs


def test_summary_marks_unstable_timings_and_shows_missing_results_as_dashes(run):
    cfg_id, other = (c["config_id"] for c in _load(run / "run.json")["configs"])
    path = run / cfg_id / "latency.json"
    latency = _load(path)
    ort, eager = _ort_row(latency, "model")
    ort["stable"] = False
    del ort["speedup_vs_torch_eager"]  # an older result: the speedup comes from eager's row
    path.write_text(json.dumps(latency))
    (run / other / "latency.json").unlink()
    (run / other / "health.json").unlink()

    rows = {(r["config_id"], r["variant"]): r for r in summary_rows(run)}
    assert rows[(cfg_id, "model")]["timing"] == "unstable"
    assert rows[(cfg_id, "model")]["speedup"] == pytest.approx(eager["p50_ms"] / ort["p50_ms"])
    _, table = _table(format_summary(list(rows.values()), legend=False))
    first = next(r for r in table if r["config_id"] == cfg_id)
    assert first["timing"] == "unstable"
    missing = next(r for r in table if r["config_id"] == other)
    assert [missing[k] for k in ("routed_inactive", "deepest_length", "ort_p50_ms", "speedup")] == ["-"] * 4
    assert missing["accuracy"] == f"{100 * _load(run / other / 'metrics.json')['test_accuracy']:.2f}"


def test_a_label_with_terminal_escapes_is_printed_escaped_not_raw(run):
    """A label edited to set the terminal's title (OSC 0) and clear the screen: the summary shows the escapes
    as text; no control character reaches the terminal."""
    cfg_id = _load(run / "run.json")["configs"][0]["config_id"]
    path = run / cfg_id / "config.json"
    config = _load(path)
    config["label"] = "evil\x1b]0;pwned\x07\x1b[2J label"
    path.write_text(json.dumps(config))
    text = format_summary(summary_rows(run), legend=False)
    assert not any(ord(c) < 32 and c != "\n" for c in text)
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J label" in text
