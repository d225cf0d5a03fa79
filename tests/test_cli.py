"""The skyfm command as a user meets it: help that teaches, reproducible output, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from skyfm.cli import cli, main

SKYFM = [sys.executable, "-m", "skyfm.cli"]


def run(args, **kw):
    return subprocess.run(SKYFM + list(args), capture_output=True, text=True, **kw)


def test_every_subcommand_has_a_help_with_an_example():
    for name, command in cli.commands.items():
        result = run([name, "--help"])
        assert result.returncode == 0, name
        assert "Usage: " in result.stdout and len(result.stdout) > 200, name
        if name not in ("instruments",):
            assert "Example" in result.stdout, f"`skyfm {name} --help` should show an example"


def test_instruments_lists_the_five(capsys):
    assert main(["instruments"]) == 0
    out = capsys.readouterr().out
    for name in ("fermi-lat", "ctao", "meerlicht", "hubble", "wise"):
        assert name in out


@pytest.mark.parametrize("args, words", [
    (["simulate", "-i", "jwst", "--out", "x"], "unknown instrument 'jwst'"),
    (["simulate", "-i", "fermi-lat", "--scene", "crowded", "--out", "x"], "--scene does not apply to fermi-lat"),
    (["instruments", "does-not-exist.yaml"], "instrument file not found"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, args, words):
    result = run(args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skyfm: error:") and words in lines[0], result.stderr


@pytest.mark.parametrize("instrument", ["fermi-lat", "meerlicht"])
def test_simulate_writes_the_same_files_for_the_same_seed(tmp_path, instrument):
    for out in ("a", "b"):
        assert main(["simulate", "-i", instrument, "--n", "2", "--size", "64", "--seed", "5", "--out", str(tmp_path / out)]) == 0
    main(["simulate", "-i", instrument, "--n", "2", "--size", "64", "--seed", "6", "--out", str(tmp_path / "c")])
    names = sorted(p.name for p in (tmp_path / "a").glob("*.fits"))
    assert len(names) == 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = sorted((tmp_path / "c").glob("*.fits"))
    assert other[0].read_bytes() != (tmp_path / "a" / names[0]).read_bytes()
    assert (tmp_path / "a" / "index.ecsv").is_file()
    assert not list(Path(tmp_path / "a").glob(".*.tmp*"))  # no temporary files left behind
