"""Reward-based objective (GRPO): its math against a hand computation, one decode per prompt, bad rewards."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from vidtune.data.conversation import DataError
from vidtune.data.quality import BadSampleConfig
from vidtune.train.objectives import rewards as reward_module
from vidtune.train.objectives.grpo import GRPOObjective, completion_mask, group_advantages, grpo_token_loss
from vidtune.train.objectives.settings import GRPOSettings
from vidtune.train.training.config import load_recipe


def test_advantages_clipping_and_kl_match_a_hand_computation() -> None:
    rewards = torch.tensor(
        [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64
    )  # two groups of 4; the second all equal
    advantages = group_advantages(rewards, 4)
    first = [1.0, 0.0, 0.0, 1.0]
    mean = sum(first) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in first) / 3)  # unbiased, as torch.std (and TRL)
    for i in range(4):
        assert float(advantages[i]) == pytest.approx((first[i] - mean) / (std + 1e-4), rel=1e-6)
    assert torch.equal(advantages[4:], torch.zeros(4, dtype=torch.float64))  # no signal in a group that scored alike

    # one token per completion: ratios inside, above and below the clip range, with both advantage signs
    logps = torch.tensor([-1.0, -1.0, -1.0, -1.0, -2.0, -0.5], dtype=torch.float64)
    old = torch.tensor([-1.5, -0.5, -1.0, -1.1, -1.5, -0.9], dtype=torch.float64)
    reference = torch.tensor([-1.2, -0.8, -1.0, -1.3, -2.5, -0.1], dtype=torch.float64)
    token_advantages = torch.tensor([1.0, -1.0, 0.7, -0.4, 2.0, -2.0], dtype=torch.float64)
    epsilon, beta = 0.2, 0.05
    loss, kl, bound = grpo_token_loss(logps, old, reference, token_advantages, epsilon, beta)
    for i in range(6):
        ratio = math.exp(float(logps[i] - old[i]))
        advantage = float(token_advantages[i])
        clipped = min(max(ratio, 1 - epsilon), 1 + epsilon)
        delta = float(reference[i] - logps[i])
        expected_kl = math.exp(delta) - delta - 1
        expected = -min(ratio * advantage, clipped * advantage) + beta * expected_kl
        assert float(loss[i]) == pytest.approx(expected, rel=1e-6), i
        assert float(kl[i]) == pytest.approx(expected_kl, rel=1e-6), i
        expected_bound = (ratio < 1 - epsilon and advantage < 0) or (ratio > 1 + epsilon and advantage > 0)
        assert bool(bound[i]) == expected_bound, i
    assert bound.tolist() == [True, True, False, False, False, False]  # above and below the range both bind


def test_completion_mask_ends_at_the_first_stop_token() -> None:
    completions = torch.tensor([[5, 6, 2, 0, 0], [7, 2, 9, 2, 0], [5, 6, 7, 8, 9]])
    assert completion_mask(completions, [2]).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_rewards_that_raise_or_return_nan_follow_the_bad_sample_budget(monkeypatch) -> None:
    def fragile(completion: str, row: dict) -> float:
        if completion == "boom":
            raise ValueError("cannot parse")
        return math.nan if completion == "nan" else 1.0

    monkeypatch.setitem(reward_module.REWARDS, "fragile", fragile)
    settings = GRPOSettings(num_generations=4, rewards=["fragile"])

    def objective(budget: BadSampleConfig) -> GRPOObjective:
        return GRPOObjective(settings, None, nullcontext, lambda m, b: (torch.zeros(0), []), [2], (), budget)

    rows = [{"answer": "red", "question": "Which color comes first?", "at": f"q.jsonl line {i}"} for i in range(40)]
    completions = ["red"] * 40
    completions[5], completions[17], completions[30] = "boom", "nan", "boom"
    tolerant = objective(BadSampleConfig(max_bad_fraction=0.1))
    rewards = tolerant.rewards(completions, rows, torch.device("cpu"))
    assert rewards.isnan().nonzero().flatten().tolist() == [5, 17, 30]
    assert [where for where, _ in tolerant.bad.bad] == ["q.jsonl line 5", "q.jsonl line 17", "q.jsonl line 30"]
    assert "raised ValueError: cannot parse" in tolerant.bad.bad[0][1] and "returned nan" in tolerant.bad.bad[1][1]
    assert group_advantages(rewards, 4)[5] == 0
    with pytest.raises(DataError, match=r"grpo rewards: .*reward fragile raised ValueError"):
        objective(BadSampleConfig()).rewards(completions, rows, torch.device("cpu"))  # 3 of 40 > 5%


@pytest.mark.parametrize("decode_once", [True, False])
def test_grpo_decodes_each_prompt_once_for_its_group(
    family_kits, demo_corpus: Path, tmp_path: Path, monkeypatch, decode_once: bool
) -> None:
    from tests.conftest import tiny_run_overrides
    from vidtune.data import dataset
    from vidtune.data.rollouts import GroupCollator
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    decodes: list[str] = []
    original = dataset.load_clip

    def counting(path, *args, **kwargs):
        decodes.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "load_clip", counting)
    prompts: list[int] = []  # prompts batched (the loader may build a batch ahead of the step that uses it)
    collate = GroupCollator.__call__
    monkeypatch.setattr(GroupCollator, "__call__", lambda self, rows: prompts.append(len(rows)) or collate(self, rows))
    overrides = tiny_run_overrides(
        family_kits("llava_next_video").model_dir,
        demo_corpus,
        tmp_path / "grpo",
        "train.objective=grpo",
        "train.grpo.num_generations=4",
        "train.grpo.max_new_tokens=4",
        "train.grpo.beta=0.1",
        f"train.grpo.decode_once={decode_once}",
        "train.batch_size=2",
        "train.max_steps=1",
    )
    output = train(load_recipe(None, overrides))
    assert sum(prompts) >= 2
    assert len(decodes) == sum(prompts) * (1 if decode_once else 4)  # 4 completions per prompt
    logged = [m for m in read_metrics(output) if "train/reward" in m]
    assert len(logged) == 1
    for key in ("train/kl", "train/clip_fraction", "train/completion_tokens", "train/rewards/exact"):
        assert math.isfinite(logged[-1][key]), key
    assert 1 <= logged[-1]["train/completion_tokens"] <= 4


def varied_reward(completion: str, row: dict) -> float:
    """A user reward (module:function) that varies over a random model's completions, so updates happen."""
    return float(len(completion) % 3)


def test_a_killed_grpo_run_resumes_bit_exactly_sampling_included(family_kits, demo_corpus: Path, tmp_path: Path):
    """kill -9 as step 3 starts (checkpoints every 2 steps), relaunch: steps 3-4 sample the same completions (same
    rewards, lengths) and log the same loss, KL and gradient norm as the uninterrupted run (dropout on)."""
    import signal
    import subprocess

    from tests.conftest import tiny_run_overrides
    from tests.faults import cli_command
    from vidtune.train.training.config import recipe_to_yaml
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    def recipe(output: Path) -> object:
        return load_recipe(
            None,
            tiny_run_overrides(
                family_kits("llava_next_video").model_dir,
                demo_corpus,
                output,
                "train.objective=grpo",
                "train.grpo.num_generations=4",
                "train.grpo.max_new_tokens=4",
                "train.grpo.beta=0.1",
                "train.grpo.rewards=[tests.test_grpo:varied_reward]",
                "train.max_steps=4",
                "train.save_every_steps=2",
                "train.batch_size=1",
                "finetune.lora.dropout=0.1",
            ),
        )

    def figures(output: Path) -> dict[int, tuple]:
        keys = ("train/loss", "train/reward", "train/kl", "train/grad_norm", "train/completion_tokens")
        return {m["step"]: tuple(m[k] for k in keys) for m in read_metrics(output) if "train/reward" in m}

    train(recipe(tmp_path / "whole"))
    cut = tmp_path / "cut"
    path = tmp_path / "cut.yaml"
    path.write_text(recipe_to_yaml(recipe(cut)))
    killed = subprocess.run(
        cli_command("train", str(path), fault="kill@2.0"), capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train(load_recipe(path))
    whole = figures(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4] and figures(cut) == whole
    assert len({v[1] for v in whole.values()}) > 1 and any(v[3] > 0 for v in whole.values())  # it really trained


def test_rewards_score_as_eval_does_and_unknown_ones_are_refused_up_front(family_kits, tmp_path: Path) -> None:
    from vidtune.train.training.config import RecipeError

    row = {"question": "Which color comes first?\nA. red\nB. blue\nAnswer with the option's letter.", "answer": "B"}
    assert [reward_module.choice_reward(c, row) for c in ("B", "(B)", "blue", "A", "red then blue", "")] == [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
    ]  # fmt: skip
    assert reward_module.exact_reward("The Red.", {"answer": "red"}) == 1.0
    assert reward_module.resolve("tests.test_grpo:varied_reward") is varied_reward

    base = [f"model.name_or_path={family_kits('llava_next_video').model_dir}", "data.sources=[{path: x.jsonl}]"]
    for name, message in (("nosuch.module:f", "cannot be loaded"), ("exactly", "unknown reward 'exactly'")):
        overrides = [*base, f"train.output_dir={tmp_path}", "train.objective=grpo", f"train.grpo.rewards=[{name}]"]
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, overrides)


def test_reasoning_format_and_temporal_grounding_rewards_score_the_answer_part() -> None:
    """`format` wants think-then-answer and nothing else; the answer rewards read only the answer tags (a thinking
    part that names the right option must not score); `temporal_iou` is the spans' overlap over their union."""
    fmt, iou, exact = reward_module.format_reward, reward_module.temporal_iou_reward, reward_module.exact_reward
    assert [fmt(c, {}) for c in (
        "<think>red, then blue</think> <answer>B</answer>",
        "<think>a\nb</think>\n<answer>B</answer>\n",
        "<answer>B</answer>",
        "<think>x</think><answer>B</answer> and more",
        "B",
    )] == [1.0, 1.0, 0.0, 0.0, 0.0]  # fmt: skip
    row = {"question": "Which color comes first?\nA. red\nB. blue", "answer": "B"}
    assert reward_module.choice_reward("<think>not A, it is B</think><answer>A</answer>", row) == 0.0
    assert reward_module.choice_reward("<think>surely A</think><answer>B</answer>", row) == 1.0
    assert exact("<think>red?</think><answer>The blue.</answer>", {"answer": "blue"}) == 1.0
    assert exact("<think>blue</think><answer>red</answer>", {"answer": "blue"}) == 0.0
    truth = {"answer": "from 2 to 6 seconds"}
    assert iou("From 2 to 6 seconds.", truth) == 1.0
    assert iou("<answer>4 - 8 s</answer>", truth) == pytest.approx(2 / 6)  # overlap 4..6 over union 2..8
    assert iou("between 0.5 and 1.5 sec", truth) == 0.0  # disjoint
    assert iou("around the middle", truth) == 0.0  # no span named
    assert iou("from 6 to 2 seconds", truth) == 0.0  # a backward span is no span
    with pytest.raises(ValueError, match="names no span"):
        iou("from 2 to 6 seconds", {"answer": "the red ball"})  # a bad row: the bad-sample budget counts it
    totals, problems, _ = reward_module.score(
        ["<think>t</think><answer>from 2 to 4 seconds</answer>"], [{"answer": "from 2 to 6 seconds", "at": "f:1"}],
        ["format", "temporal_iou"], [0.5, 1.0],
    )  # fmt: skip
    assert totals == [pytest.approx(0.5 + 2 / 4)] and problems == []


@pytest.mark.slow
def test_zero3_grpo_finishes_when_ranks_generate_different_lengths_and_equals_one_process(
    family_kits, demo_corpus: Path, tmp_path: Path, monkeypatch
):
    """2 processes under ZeRO-3: rank 1's sampling stops after 1 token, rank 0's runs to 6. Without synced_gpus the
    rank that finished first would leave the other waiting in its parameter all-gathers forever (ms-swift #7899).
    Then each completion is replaced by a fixed one (chosen by its prompt and place in the group, tests/faults.py
    fixedgen): given the same rollouts, the 2-process run logs the 1-process run's loss, rewards, completion lengths
    and gradient norm at every step (the same global batch: 1 prompt x 2 micro-batches), and its adapter is equal."""
    from tests.conftest import tiny_run_overrides
    from tests.faults import inject
    from tests.test_distributed import adapter, assert_adapters_equal, engine, launch
    from vidtune.train.training.config import recipe_to_yaml
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    def overrides(output: Path, *extra: str) -> list[str]:
        return tiny_run_overrides(
            family_kits("llava_next_video").model_dir,
            demo_corpus,
            output,
            "train.objective=grpo",
            "train.grpo.num_generations=2",
            "train.grpo.max_new_tokens=6",
            "train.grpo.beta=0.1",
            "train.grpo.rewards=[tests.test_grpo:varied_reward]",
            "train.max_steps=2",
            "train.batch_size=1",
            # Adam's eps 1e-8 lets an element whose summed gradient cancels to ~0 move by a round-off-chosen step
            # (1 of 2,048 LoRA elements, 1.9e-4 off here): eps 1e-3 keeps round-off as round-off (tests/test_fsdp2.py)
            "train.adam_epsilon=1e-3",
            *extra,
        )

    def figures(output: Path) -> list[tuple[float, ...]]:
        keys = ("train/loss", "train/reward", "train/kl", "train/completion_tokens", "train/grad_norm")
        return [tuple(m[k] for k in keys) for m in read_metrics(output) if "train/reward" in m]

    two = tmp_path / "two"
    path = tmp_path / "grpo.yaml"
    path.write_text(recipe_to_yaml(load_recipe(None, overrides(two))))
    result = launch(path, "zero3.yaml", fault="shortgen@1,fixedgen@3")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert engine(two) == {"num_processes": 2, "distributed_type": "DEEPSPEED", "zero_stage": 3}
    inject(monkeypatch, "fixedgen@3")
    one = tmp_path / "one"
    train(load_recipe(None, overrides(one, "train.grad_accum_steps=2")))
    ours, theirs = figures(two), figures(one)
    assert len(ours) == len(theirs) == 2 and all(f[-1] > 0 for f in theirs)  # it really updated
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-6)
    assert_adapters_equal(adapter(two), adapter(one))


def test_rollouts_never_sample_media_placeholder_tokens_and_sample_within_top_k(family_kits) -> None:
    """A sampled <video> id in a completion broke the update's forward (tokens vs features mismatch, seen in the
    demo at temperature 1.3): the rollout suppresses the processor's media token ids. train.grpo.top_k reaches
    generate (a negative one is refused when the recipe loads)."""
    from types import SimpleNamespace

    from vidtune.train.objectives.select import build_objective
    from vidtune.train.training.config import RecipeError, load_recipe

    kit = family_kits("llava_next_video")
    settings = [f"model.name_or_path={kit.model_dir}", "data.sources=[{path: x.jsonl}]", "train.objective=grpo"]
    with pytest.raises(RecipeError, match="top_k >= 0"):
        load_recipe(None, [*settings, "train.output_dir=/tmp/x", "train.grpo.top_k=-1"])
    recipe = load_recipe(None, [*settings, "train.output_dir=/tmp/x", "train.grpo.top_k=4"])
    seen = {}

    def generate(**kwargs):
        seen.update(kwargs)
        return torch.cat([kwargs["input_ids"], torch.full((len(kwargs["input_ids"]), 1), 2)], 1)

    model = SimpleNamespace(generate=generate, eval=lambda: None, train=lambda: None)
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, num_processes=1, autocast=nullcontext)
    head = torch.nn.Linear(2, 2)
    model.get_output_embeddings = lambda: head
    objective = build_objective(recipe, model, accelerator, kit.family, kit.processor, zero3=False)
    objective.rollout(model, {"input_ids": torch.ones(2, 3, dtype=torch.long)})
    assert kit.processor.video_token_id in seen["suppress_tokens"]
    assert kit.processor.image_token_id in seen["suppress_tokens"]
    assert seen["top_k"] == 4 and seen["temperature"] == 1.0


def test_a_grpo_step_runs_for_every_family(family_kit, demo_corpus: Path, tmp_path: Path) -> None:
    """Each family samples completions, scores them and takes an update with a KL to its reference: the prompt's
    per-token tensors (Qwen's mm_token_type_ids) and positions grow with the completion (Qwen2.5-Omni's thinker
    computes them itself; it ignores logits_to_keep, which broke its log-probs)."""
    from tests.conftest import tiny_run_overrides
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    overrides = tiny_run_overrides(
        family_kit.model_dir,
        demo_corpus,
        tmp_path / "grpo",
        "train.objective=grpo",
        "train.grpo.num_generations=2",
        "train.grpo.max_new_tokens=3",
        "train.grpo.beta=0.1",
        "train.grpo.rewards=[tests.test_grpo:varied_reward]",
        "train.batch_size=2",
        "train.max_steps=1",
    )
    logged = [m for m in read_metrics(train(load_recipe(None, overrides))) if "train/reward" in m]
    assert len(logged) == 1 and all(math.isfinite(v) for v in logged[0].values())
    assert 1 <= logged[0]["train/completion_tokens"] <= 3
