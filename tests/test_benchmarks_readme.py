"""The benchmarks say what they measured: README's table is the committed results file's, every goal figure of a
row counts in its verdict, and a timed comparison first checks that both sides compute the same function."""
from __future__ import annotations

import json

import pytest

from benchmarks import readme
from benchmarks.run import _all_goals, _verdict, group_memory


def test_readme_table_is_the_committed_results():
    report = json.loads(readme.RESULTS.read_text())
    block = readme.current_block(readme.README.read_text())
    assert block is not None, "README.md lost its generated benchmark block"
    assert block == readme.render(report), "README's table differs from benchmarks/results.json: " \
                                           "run `python -m benchmarks.readme`"
    # every row of the file (but the detail rows) is in README, verdict included
    for row in report["rows"]:
        if not row[1].startswith("  "):
            assert " | ".join(str(c).strip() for c in row) in " | ".join(
                c.strip() for c in block.replace("\n", " | ").split("|")), row


def test_verdict_counts_every_goal_figure_in_the_row():
    assert _all_goals(("allocator", _verdict(1.000, 1.0)), ("RSS", _verdict(1.016, 1.0))) == "MISSED (RSS)"
    assert _all_goals(("allocator", "met"), ("RSS", "met")) == "met"
    assert _all_goals(("a", "within noise"), ("b", "met")) == "within noise (a)"

    class Args:
        device, memory_steps = "cpu", 2

    import benchmarks.lora_vs_peft as lora
    fake = {"model": "minilm", "steps": 2, "peak_mib": {"surgery": 386.5, "peft": 380.6}, "ratio": 386.5 / 380.6,
            "allocator_peak_mib": {"surgery": 225.47, "peft": 225.47}, "allocator_ratio": 1.0}
    original = lora.train_memory_both
    lora.train_memory_both = lambda *a, **k: fake
    try:
        _, rows = group_memory(Args())
    finally:
        lora.train_memory_both = original
    assert all(row[-1] == "MISSED (RSS)" for row in rows), rows     # the row read "met"


def test_memory_rows_of_the_results_file_count_the_rss():
    report = json.loads(readme.RESULTS.read_text())
    for row in report["groups"]["memory"]["rows"]:
        figure, verdict = row[2], row[4]
        ratios = [float(part.split("= ")[-1].rstrip("x")) for part in figure.split("; ")]
        assert (verdict == "met") == all(r <= 1.0 for r in ratios), row


def test_lora_comparison_checks_equal_outputs_before_timing():
    peft = pytest.importorskip("peft")  # noqa: F841
    import benchmarks.lora_vs_peft as lora
    base = lora.build("llama").eval()
    ours, theirs = lora.with_lora("llama", base, "surgery"), lora.with_lora("llama", base, "peft")
    batch = lora.inputs("llama", base, (1, 8))
    assert lora.check_same_outputs(ours, theirs, batch) < 1e-5
    import torch
    with torch.no_grad():                            # a PEFT model that computes something else is refused
        theirs.get_base_model().lm_head.weight.add_(0.1)
    with pytest.raises(AssertionError, match="outputs differ"):
        lora.check_same_outputs(ours, theirs, batch)
