"""bench/harness/results.py: each benchmark rewrites only its own section of bench/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from bench.harness.results import write_section


def test_write_section_creates_replaces_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section(path, "a", "## A\n\nfirst")
    write_section(path, "b", "## B\n\nother")
    assert path.read_text().startswith("# Benchmark results\n")
    write_section(path, "a", "## A\n\nsecond\n\n\n")
    text = path.read_text()
    assert "first" not in text
    assert text.count("<!-- bench:a -->") == 1 and text.count("<!-- /bench:a -->") == 1
    assert text.index("second") < text.index("## B")  # replaced in place, order kept
    assert "other" in text


def test_write_section_appends_after_hand_written_text(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro by hand\n")
    write_section(path, "peers", "## Peers")
    text = path.read_text()
    assert text.startswith("# Results\n\nintro by hand\n")
    assert text.rstrip().endswith("<!-- /bench:peers -->")
