"""What the README promises a first-time user: `import had_hf` before loading."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return " ".join((REPO / "README.md").read_text(encoding="utf-8").split())  # line breaks do not count


def test_readme_says_to_import_had_hf_before_loading():
    text = _readme()
    assert "`import had_hf` before loading a HAD folder" in text
    assert "which do not mention had_hf" in text
