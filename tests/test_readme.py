"""What the README promises a first-time user: `import had_hf` before loading, and the default run's figure (one
figure or the spread between machines) holding the committed measurement."""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return " ".join((REPO / "README.md").read_text(encoding="utf-8").split())  # line breaks do not count


def test_readme_says_to_import_had_hf_before_loading():
    text = _readme()
    assert "`import had_hf` before loading a HAD folder" in text
    assert "which do not mention had_hf" in text


def test_default_run_figure_is_a_spread_holding_the_committed_measurement():
    recorded = json.loads((REPO / "benchmarks" / "results" / "default_run_cpu.json").read_text())
    match = re.search(r"SST-2 dev accuracy (\d+\.\d\d) -> (\d+\.\d\d)(?:-(\d+\.\d\d))?", _readme())
    assert match, "the README states the default run's accuracies as 'SST-2 dev accuracy T -> S' (or S as low-high)"
    teacher, low = float(match.group(1)), float(match.group(2))
    high = float(match.group(3)) if match.group(3) else low  # one figure: the committed measurement itself
    assert teacher == round(100 * recorded["teacher"], 2)
    assert low <= round(100 * recorded["had"], 2) <= high
    assert "varies by a few tenths between machines" in _readme()  # a single figure says it may differ elsewhere
