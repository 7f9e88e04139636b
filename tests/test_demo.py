"""The README's main command: the whole demo, through the packaged recipes, on CPU."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_reaches_its_accuracy_targets(demo_run):
    root, report = demo_run
    assert report["base: caption exact match"] >= 0.9
    assert 0.3 <= report["base: order question, right colour first (chance 50%)"] <= 0.7  # the base is at chance
    assert report["instruct: order question exact match"] >= 0.95
    assert report["chat: second-turn exact match"] >= 0.9
    assert json.loads((root / "demo_report.json").read_text()) == report
    chat = (root / "demo_chat.txt").read_text()
    assert chat.count("  model: ") == 2 and "(truth: " in chat
    for stage in ("base", "instruct", "chat"):
        assert (root / "runs" / stage / "vidtune.json").is_file()
