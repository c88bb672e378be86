"""What every stage is handed (suite/stages/base.py): one typed part of the settings per stage, each with the
defaults of the CLI's flags left out, and torch.compile for training in one encoding from the flag to train()."""

import pytest

from capsbench.suite import train as training
from capsbench.suite.cli import build_parser
from capsbench.suite.cli.options import stage_settings, time_settings, training_settings
from capsbench.suite.errors import ConfigError
from capsbench.suite.presets import get_preset
from capsbench.suite.stages import (
    ExportSettings,
    HealthSettings,
    PruneSettings,
    ReportSettings,
    Settings,
    TrainSettings,
)
from capsbench.suite.stages.time import TimeSettings


def test_every_stage_has_its_part_with_defaults():
    s = Settings()
    assert s.train == TrainSettings(compile="auto", precision="fp32")
    assert s.health == HealthSettings(threshold=None, output=None)
    assert s.prune == PruneSettings()
    assert s.export == ExportSettings(opset=None, parity_images=1000)
    assert s.time == TimeSettings()  # never None: the time and cpp stages need no fallback
    assert s.report == ReportSettings(baseline=None)
    assert (s.device, s.force, s.progress, s.keep_intermediate) == (None, False, True, False)


@pytest.mark.parametrize(
    "argv, compile",
    [
        (["train"], "auto"),
        (["train", "--compile", "off"], "off"),
        (["train", "--compile"], "default"),
        (["train", "--compile", "max-autotune"], "max-autotune"),
        (["all", "--train-compile", "off"], "off"),
        (["all"], "auto"),
    ],
)
def test_the_compile_flag_reaches_the_train_settings_as_given(monkeypatch, argv, compile):
    monkeypatch.setattr("capsbench.suite.env.compile_unavailable", lambda: None)
    args = build_parser().parse_args([*argv, "--precision", "bf16"])
    assert training_settings(args) == TrainSettings(compile=compile, precision="bf16")


def test_the_commands_build_typed_settings():
    parser = build_parser()
    args = parser.parse_args(
        ["all", "--preset", "smoke", "--baseline", "runs/old", "--force", "--train-compile", "off"]
    )
    s = stage_settings(
        args,
        time=time_settings(args),
        report=ReportSettings(baseline=args.baseline),
        train=training_settings(args),
    )
    assert s.force and s.report.baseline is not None and s.report.baseline.name == "old"
    assert s.train.compile == "off" and s.time == time_settings(args)


def test_train_refuses_a_compile_mode_outside_its_one_encoding(tmp_path):
    cfg = get_preset("smoke").configs()[0]
    for mode in (None, "eager"):  # None was eager before "off" became the one word for it
        with pytest.raises(ConfigError, match="unknown compile mode"):
            training.train(cfg, tmp_path, None, device="cpu", progress=False, compile_mode=mode)
    assert not any(tmp_path.iterdir())
