"""`capsbench check`'s latency gates on synthetic sample sets: a real shift beyond the tolerance is flagged,
noise and shifts within the tolerance are not, unstable or sample-less measurements are never regressions,
and machine-normalised figures replace absolute times across machines."""

import json

import numpy as np
import pytest

from capsbench.reports.compare import Tolerances, compare_runs, ratio_interval
from capsbench.suite.cli import main

ABSOLUTE = Tolerances(gate_absolute=True)
CONFIG = "cfg0"
MACHINE = {"cpu": "Test CPU", "cpu_threads": 2, "gpu": None}


def _write(path, kind, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "kind": kind, **data}))


def _row(backend, batch, samples, stable=True):
    s = np.asarray(samples)
    return {
        "variant": "model",
        "backend": backend,
        "batch": batch,
        "status": "ok",
        "p50_ms": float(np.median(s)),
        "gemm_fraction": 1.0 / float(np.median(s)),
        "stable": stable,
        "samples_ms": s.tolist(),
    }


def make_run(root, rows, machine=MACHINE, gemm_samples=None, probe=None):
    """A run folder with one config whose latency.json holds `rows` (and `probe`, its machine probe)."""
    _write(root / "run.json", "run", {"environment": machine})
    _write(root / CONFIG / "config.json", "config", {"config_id": CONFIG, "label": "test", "config": {}})
    gemm = {"p50_ms": 1.0, "samples_ms": list(gemm_samples if gemm_samples is not None else [1.0] * 5)}
    latency = {"status": "complete", "rows": rows, "gemm": gemm}
    if probe is not None:
        latency["machine_probe"] = probe
    _write(root / CONFIG / "latency.json", "latency", latency)
    return root


def probe(min_ms, drift=1.02):
    """A machine probe as the time stage writes it: the GEMM's fastest calls around `min_ms`."""
    return {"min_ms": min_ms, "p50_ms": min_ms * 1.03, "gflops_per_s": 17180 / min_ms, "drift": drift}


def samples(rng, median_ms, n=50, spread=0.03):
    """Timed calls around `median_ms`: lognormal jitter plus a few slow outliers, as a quiet CPU gives."""
    s = median_ms * rng.lognormal(0.0, spread, n)
    s[rng.choice(n, 3, replace=False)] *= 3
    return s


def two_runs(tmp_path, ort_scale=1.0, eager_scale=1.0, spread=0.03, seed=0, probes=(None, None), **kw):
    rng = np.random.default_rng(seed)

    def rows(o, e):
        return [
            _row(backend, b, samples(rng, med * b * scale, spread=spread))
            for b in (1, 8)
            for backend, med, scale in (("ort_cpu", 0.3, o), ("torch_eager", 0.6, e))
        ]

    base = make_run(tmp_path / "base", rows(1.0, 1.0), probe=probes[0], **kw)
    cur = make_run(tmp_path / "cur", rows(ort_scale, eager_scale), probe=probes[1], **kw)
    return cur, base


def latency_checks(result):
    return [ch for ch in result["checks"] if "noise" in ch]


def test_ratio_interval_covers_the_ratio_of_medians():
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 0.5, 200), rng.normal(5, 0.5, 200)
    point, low, high = ratio_interval([([a], 1), ([b], -1)])  # one round each
    assert point == pytest.approx(np.median(a) / np.median(b))
    assert low < point < high and high - low < 0.2
    assert ratio_interval([([a], 1), ([b], -1)]) == (point, low, high)  # seeded: same verdicts every time


@pytest.mark.parametrize("seed", range(5))
def test_noise_alone_is_not_flagged(tmp_path, seed):
    result = compare_runs(*two_runs(tmp_path, seed=seed))
    checks = latency_checks(result)
    assert len(checks) == 2 + 4  # speedup at 2 batches, p50 of 2 backends at 2 batches
    assert result["regressions"] == [] and result["ok"]


def test_a_real_slowdown_beyond_the_tolerance_is_flagged(tmp_path):
    runs = two_runs(tmp_path, ort_scale=1.6)
    speedups = {"speedup_vs_eager[model/ort_cpu/1]", "speedup_vs_eager[model/ort_cpu/8]"}
    assert {ch["metric"] for ch in compare_runs(*runs)["regressions"]} == speedups
    result = compare_runs(*runs, ABSOLUTE)
    flagged = {ch["metric"] for ch in result["regressions"]}
    assert flagged == speedups | {"p50_ms[model/ort_cpu/1]", "p50_ms[model/ort_cpu/8]"}
    ch = result["regressions"][0]
    assert ch["ci"][1] < 1 - result["tolerances"]["speedup_drop"]
    assert ch["gate"] == "ratio to torch eager in the same run"


def test_a_real_shift_within_the_tolerance_is_not_flagged(tmp_path):
    result = compare_runs(*two_runs(tmp_path, ort_scale=1.1), ABSOLUTE)
    assert result["regressions"] == []
    assert all(
        ch["ci"][0] > 1.0 for ch in latency_checks(result) if ch["metric"].startswith("p50_ms[model/ort")
    )


def test_a_large_change_within_wide_noise_is_not_flagged(tmp_path):
    # medians 40% apart, but each measurement scatters by a factor of 2: the interval spans the tolerance
    rng = np.random.default_rng(3)
    wide = [_row("ort_cpu", 1, rng.lognormal(0.0, 0.7, 12))]
    base = make_run(tmp_path / "base", wide)
    cur = make_run(tmp_path / "cur", [_row("ort_cpu", 1, rng.lognormal(np.log(1.4), 0.7, 12))])
    result = compare_runs(cur, base, ABSOLUTE)
    (ch,) = latency_checks(result)
    assert ch["current"] > ch["baseline"] * 1.25 and ch["status"] == "noisy"


def test_a_whole_machine_slowdown_is_reported_not_gated_unless_absolute_gating_is_asked_for(tmp_path):
    runs = two_runs(tmp_path, ort_scale=1.5, eager_scale=1.5)  # both runtimes alike: the same-run ratio holds
    result = compare_runs(*runs)
    assert result["regressions"] == [] and result["ok"]
    assert {ch["status"] for ch in latency_checks(result) if ch["metric"].startswith("p50_ms")} == {"info"}
    assert len(compare_runs(*runs, ABSOLUTE)["regressions"]) == 4


def test_an_unstable_measurement_is_reported_not_gated(tmp_path):
    rng = np.random.default_rng(0)
    base = make_run(tmp_path / "base", [_row("ort_cpu", 1, samples(rng, 0.3))])
    cur = make_run(tmp_path / "cur", [_row("ort_cpu", 1, samples(rng, 3.0), stable=False)])
    result = compare_runs(cur, base)
    (ch,) = latency_checks(result)
    assert ch["status"] == "unstable" and result["regressions"] == [] and result["not_gated"] == [ch]


def test_rows_without_raw_samples_are_not_gated(tmp_path):
    rng = np.random.default_rng(0)
    old = _row("ort_cpu", 1, samples(rng, 0.3))
    del old["samples_ms"], old["stable"]  # latency.json written before samples were kept
    base = make_run(tmp_path / "base", [old])
    cur = make_run(tmp_path / "cur", [_row("ort_cpu", 1, samples(rng, 3.0))])
    (ch,) = latency_checks(compare_runs(cur, base, ABSOLUTE))
    assert ch["status"] == "not_gated"


def test_across_machines_only_machine_normalised_figures_are_gated(tmp_path):
    other = {**MACHINE, "cpu": "Another CPU"}
    rng = np.random.default_rng(0)
    base = make_run(tmp_path / "base", [_row("ort_cpu", 1, samples(rng, 0.3))], machine=other)
    # the other machine is twice as slow on everything, GEMM included: nothing regressed
    cur = make_run(tmp_path / "cur", [_row("ort_cpu", 1, samples(rng, 0.6))], gemm_samples=[2.0] * 5)
    result = compare_runs(cur, base)
    assert not result["same_machine"]
    (ch,) = latency_checks(result)
    assert ch["metric"] == "gemm_fraction[model/ort_cpu/1]"
    assert ch["gate"] == "fraction of the GEMM rate measured in the same run" and ch["status"] == "ok"
    # the same slowdown with an unchanged GEMM rate is the code's: flagged
    cur = make_run(tmp_path / "cur2", [_row("ort_cpu", 1, samples(rng, 0.6))])
    (ch,) = latency_checks(compare_runs(cur, base))
    assert ch["status"] == "regressed"


def test_check_prints_both_values_the_tolerance_and_the_noise(tmp_path, capsys):
    cur, base = two_runs(tmp_path, ort_scale=1.6)
    assert main(["check", str(cur), "--baseline", str(base), "--gate-absolute"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "p50_ms[model/ort_cpu/8]" in ln)
    assert line.startswith("REGRESSED") and "tolerance +25%" in line and "95% interval" in line
    assert "->" in line and "absolute p50, same machine" in line
    assert "4 regressions" in out


def _rounds_row(backend, rounds):
    """A pooled row as the time stage writes it: every round's samples kept apart."""
    row = _row(backend, 1, np.concatenate(rounds))
    return {**row, "round_samples_ms": [list(r) for r in rounds]}


def _process_runs(tmp_path, rng, base_speeds, cur_speeds, ort_scale=1.0):
    """Two runs of three rounds each, every round a process whose whole speed differs (as on a shared VM):
    tight calls within a round, the rounds apart by the given factors."""

    def run(name, speeds, scale):
        rows = [
            _rounds_row(backend, [samples(rng, med * s * sc) for s in speeds])
            for backend, med, sc in (("ort_cpu", 0.3, scale), ("torch_eager", 0.6, 1.0))
        ]
        return make_run(tmp_path / name, rows)

    return run("cur", cur_speeds, ort_scale), run("base", base_speeds, 1.0)


def test_process_to_process_speed_shifts_widen_the_interval_instead_of_failing_the_gate(tmp_path):
    rng = np.random.default_rng(0)
    # every process of the current run is 40% slower on ORT than the baseline's fastest ones, as whole
    # processes on this VM differed (issue 14); within each round the calls are tight
    cur, base = _process_runs(tmp_path, rng, [1.0, 1.4, 1.0], [1.4, 1.4, 1.0])
    pooled = compare_runs(cur, base, ABSOLUTE)
    assert pooled["regressions"] == []
    (p50,) = [ch for ch in latency_checks(pooled) if ch["metric"] == "p50_ms[model/ort_cpu/1]"]
    assert "3 round(s)" in p50["noise"] and p50["ci"][1] > 1.25  # the interval reaches the slow rounds
    # the same calls without their rounds look like one tight measurement each: the shift passes for a finding
    for run in (cur, base):
        path = run / CONFIG / "latency.json"
        lat = json.loads(path.read_text())
        for row in lat["rows"]:
            del row["round_samples_ms"]
        path.write_text(json.dumps(lat))
    (one,) = [ch for ch in latency_checks(compare_runs(cur, base, ABSOLUTE)) if ch["metric"] == p50["metric"]]
    assert "1 round(s)" in one["noise"] and one["ci"][1] - one["ci"][0] < p50["ci"][1] - p50["ci"][0]


def test_a_real_slowdown_in_every_round_is_flagged_despite_process_shifts(tmp_path):
    rng = np.random.default_rng(1)
    cur, base = _process_runs(tmp_path, rng, [1.0, 1.2, 1.0], [1.0, 1.2, 1.1], ort_scale=2.0)
    flagged = {ch["metric"] for ch in compare_runs(cur, base)["regressions"]}
    assert flagged == {"speedup_vs_eager[model/ort_cpu/1]"}


def test_noise_wider_than_the_tolerance_is_reported_noisy_never_a_regression(tmp_path, capsys):
    rng = np.random.default_rng(2)
    cur, base = _process_runs(tmp_path, rng, [1.0, 1.5, 1.0], [1.5, 1.5, 1.0])
    result = compare_runs(cur, base, ABSOLUTE)
    noisy = [ch for ch in result["checks"] if ch["status"] == "noisy"]
    assert noisy and result["regressions"] == [] and all(ch in result["not_gated"] for ch in noisy)
    assert main(["check", str(cur), "--baseline", str(base), "--gate-absolute"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("NOISY"))
    assert "noise too large to gate at" in line


# ------------------------------------------------------------------------ the machine probe: disturbed runs


SPEEDUPS = {"speedup_vs_eager[model/ort_cpu/1]", "speedup_vs_eager[model/ort_cpu/8]"}


def test_a_real_slowdown_on_a_steady_machine_is_still_flagged(tmp_path):
    # probes 4% apart, as same-commit runs on the quiet VM gave: comparable, so the slowdown is a finding
    result = compare_runs(*two_runs(tmp_path, ort_scale=1.6, probes=(probe(90.0), probe(93.5))))
    assert {ch["metric"] for ch in result["regressions"]} == SPEEDUPS


def test_a_run_timed_while_the_machine_ran_slower_is_disturbed_never_a_regression(tmp_path):
    # The baseline was timed beside a competing process: its GEMM probe ran 1.9x slower, and its same-run
    # ratio was skewed (torch slowed more than ORT), which a quiet rerun then seemed to lose (issue 14).
    cur, base = two_runs(tmp_path, ort_scale=1.6, probes=(probe(175.0), probe(92.0)))
    result = compare_runs(cur, base)
    assert result["regressions"] == [] and result["ok"]
    gates = {ch["metric"]: ch for ch in latency_checks(result)}
    assert {gates[m]["status"] for m in SPEEDUPS} == {"disturbed"}
    assert all(ch in result["not_gated"] for ch in gates.values())
    assert "different speed in the two runs" in gates["speedup_vs_eager[model/ort_cpu/1]"]["noise"]


def test_a_probe_that_drifted_within_one_run_disturbs_its_gates(tmp_path):
    cur, base = two_runs(tmp_path, ort_scale=1.6, probes=(probe(90.0), probe(90.0, drift=1.3)))
    result = compare_runs(cur, base)
    assert result["regressions"] == []
    noise = {ch["noise"] for ch in latency_checks(result)}
    assert all("speed changed during the current run (GEMM probe varied 1.30x)" in n for n in noise)


def test_the_machine_shift_is_a_tolerance_the_user_sets(tmp_path, capsys):
    cur, base = two_runs(
        tmp_path, ort_scale=1.6, probes=(probe(90.0), probe(108.0))
    )  # 20% apart, beyond the default 15%
    assert main(["check", str(cur), "--baseline", str(base)]) == 0
    out = capsys.readouterr().out
    assert "6 disturbed" in out and any(ln.startswith("DISTURBED") for ln in out.splitlines())
    assert main(["check", str(cur), "--baseline", str(base), "--machine-shift", "0.25"]) == 1


def test_a_process_speed_that_moves_both_runtimes_cancels_in_their_same_run_ratio(tmp_path):
    # ORT 1.6x slower in every round of the current run; each round a process whose speed moves both runtimes
    # (they take turns in it): resampled round by round together, the speed cancels and the slowdown shows
    rng = np.random.default_rng(4)
    cur, base = _process_runs(tmp_path, rng, [1.0, 1.5, 1.0], [1.5, 1.0, 1.5], ort_scale=1.6)
    (gate,) = [ch for ch in latency_checks(compare_runs(cur, base)) if ch["metric"].startswith("speedup")]
    assert gate["status"] == "regressed" and gate["ci"][1] < 0.8
    # the same four rows resampled independently: the process speeds widen the interval past the tolerance
    rows = {}
    for name, run in (("cur", cur), ("base", base)):
        for r in json.loads((run / CONFIG / "latency.json").read_text())["rows"]:
            rows[name, r["backend"]] = r["round_samples_ms"]
    _, low, high = ratio_interval(
        [(rows["cur", "torch_eager"], 1), (rows["cur", "ort_cpu"], -1)]
        + [(rows["base", "torch_eager"], -1), (rows["base", "ort_cpu"], 1)]
    )
    assert low < 0.8 < high
