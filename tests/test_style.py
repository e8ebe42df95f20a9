"""The code stays formatted and lint-clean: ruff, snakefmt and snakemake --lint."""

import subprocess

import pytest

from conftest import BIN, PROJECT, snakemake


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "scripts", "tests", "bench"],
        ["ruff", "format", "--check", "scripts", "tests", "bench"],
        ["snakefmt", "--check", "Snakefile", "rules"],
    ],
    ids=["ruff-check", "ruff-format", "snakefmt"],
)
def test_formatters_are_clean(command):
    result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint_is_clean(tmp_path):
    result = snakemake("--lint", "--cores", "1", results_dir=tmp_path)
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr
