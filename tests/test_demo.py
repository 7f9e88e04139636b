"""The README's main command: the whole demo, through the packaged recipes, on CPU."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_reaches_its_accuracy_targets(tmp_path, capsys):
    from vidtune.train.demo import run_demo

    report = run_demo(tmp_path / "demo")
    assert report["base: caption exact match"] >= 0.9
    assert 0.3 <= report["base: order question, right colour first (chance 50%)"] <= 0.7  # the base is at chance
    assert report["instruct: order question exact match"] >= 0.95
    assert report["chat: second-turn exact match"] >= 0.9
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text()) == report
    out = capsys.readouterr().out
    assert "== a chat about a held-out clip" in out and out.count("model: ") == 2
    for stage in ("base", "instruct", "chat"):
        assert (tmp_path / "demo" / "runs" / stage / "vidtune.json").is_file()
