"""`had-hf`: parsing, --help and usage errors import neither torch nor transformers (`import had_hf` takes seconds)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# runs the CLI and reports which heavy modules it imported
PROBE = """
import sys
import had_hf_cli
try:
    had_hf_cli.main(sys.argv[1:])
except SystemExit:
    pass
print("imported:", sorted(name for name in ("torch", "transformers", "had_hf") if name in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["export", "--help"], ["push", "--help"], ["export", "out"], ["push", "out"], []],
    ids=["help", "export-help", "push-help", "export-usage-error", "push-usage-error", "no-command"],
)
def test_parsing_and_help_import_neither_torch_nor_transformers(argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip().endswith("imported: []"), done.stdout + done.stderr
    assert "usage: had-hf" in done.stdout + done.stderr


def test_the_entry_point_is_the_light_module():
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert setup["project"]["scripts"]["had-hf"] == "had_hf_cli:main"
    assert "had_hf_cli" in setup["tool"]["setuptools"]["py-modules"]  # shipped beside the package
