"""The command line as a whole (suite/cli/__init__.py's main, and `python -m capsbench.suite.cli`): every command
has help, the module entry point runs it, and a SIGTERM unwinds like Ctrl-C."""

import subprocess
import sys

import pytest


def test_every_command_has_help(cli, capsys):
    for argv in (
        ["--help"],
        ["presets", "--help"],
        ["train", "--help"],
        ["health", "--help"],
        ["data", "--help"],
        ["data", "fetch", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 0
        assert "usage: capsbench" in capsys.readouterr().out


@pytest.mark.slow
def test_module_entry_point_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "capsbench.suite.cli", "presets"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "smoke" in result.stdout


@pytest.mark.slow
def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """A SIGTERM'd capsbench ends through the KeyboardInterrupt path (exit 130, its message), so `with` blocks
    remove their temp folders and subprocess.run kills its child."""
    code = (
        "import os, signal, sys, threading\n"
        "from capsbench.suite.cli import main\n"
        "from capsbench.suite.cli import options\n"
        "def slow(args):\n"
        "    import tempfile, time\n"
        f"    with tempfile.TemporaryDirectory(prefix='capsbench-', dir={str(tmp_path)!r}):\n"
        "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
        "import capsbench.suite.cli.presets as p\n"
        "p.run = slow\n"
        "sys.exit(main(['presets']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 130, res.stderr
    assert "interrupted" in res.stderr
    assert list(tmp_path.glob("capsbench-*")) == []
