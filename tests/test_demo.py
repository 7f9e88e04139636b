"""The README's main command: the whole demo, through the packaged recipes, on CPU."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_demo_reaches_its_accuracy_targets(demo_run):
    root, report = demo_run
    assert report["base: caption exact match"] >= 0.9
    assert 0.3 <= report["base: order question, right colour first (chance 50%)"] <= 0.7  # the base is at chance
    assert report["instruct: order question exact match"] >= 0.95
    assert report["instruct: caption exact match (captions mixed in)"] >= 0.9  # the mixed-in skill is kept
    assert report["chat: second-turn exact match"] >= 0.9
    assert json.loads((root / "demo_report.json").read_text()) == report
    chat = (root / "demo_chat.txt").read_text()
    assert chat.count("  model: ") == 2 and "(truth: " in chat
    for stage in ("base", "instruct", "chat"):
        assert (root / "runs" / stage / "vidtune.json").is_file()


@pytest.mark.slow
def test_demo_model_is_tiny_and_deeper_than_the_test_model(demo_run):
    from safetensors import safe_open

    root, _ = demo_run
    config = json.loads((root / "tiny-model" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    with safe_open(str(root / "tiny-model" / "model.safetensors"), "pt") as weights:
        total = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    assert 100_000 < total < 1_000_000
