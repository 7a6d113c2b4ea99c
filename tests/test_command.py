"""The ``ptray`` command: one entry point, a subcommand per thing a user runs, each one's flags from the configs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptray.command import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "study", "analyse", "model", "publish"):
        lines = [line for line in out.splitlines() if line.strip().startswith(name + " ")]
        assert len(lines) == 1 and len(lines[0].split(None, 1)[1]) > 10, name


def test_the_console_script_is_installed_and_runs():
    exe = shutil.which("ptray", path=str(Path(sys.executable).parent))
    assert exe is not None, "pip install -e . declares the ptray console script (pyproject.toml [project.scripts])"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "subcommands:" in out.stdout


@pytest.mark.parametrize("sub, flag", [("train", "--max-tokens-per-forward"), ("study", "--group-size"),
                                       ("analyse", "--experiment"), ("publish", "--tracking-uri")])
def test_each_subcommands_help_comes_from_its_configs(sub, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([sub, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: ptray {sub}") and flag in out


def test_model_subcommands(capsys, tmp_path):
    assert main(["model", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["model", "tiny", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


def test_an_unknown_subcommand_is_one_line_with_a_suggestion(capsys):
    assert main(["trian"]) == 2
    assert capsys.readouterr().err == "error: unknown subcommand 'trian'; did you mean 'train'? (see ptray --help)\n"
    assert main([]) == 2


def test_the_documented_module_entry_points_still_work():
    documented = (["-m", "ptray.train", "--help"], [str(ROOT / "sweeps" / "all.py"), "--help"],
                  ["-m", "ptray", "--help"])
    for argv in documented:
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, (argv, out.stderr[-500:])
