"""Preference (DPO) objective: its data, its loss against a hand computation and TRL's, its reference model."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vidtune.data.conversation import DataError, assistant_texts
from vidtune.data.dataset import DataConfig, Measurer, measure_and_filter
from vidtune.data.quality import BadSampleConfig, BadSampleLog
from vidtune.data.sources import SourceConfig, iter_conversations, load_conversations
from vidtune.data.video import SamplingConfig
from vidtune.train.objectives.dpo import DPOObjective, dpo_loss
from vidtune.train.objectives.settings import DPOSettings


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preference_layouts_of_peers_normalise_to_the_same_pair(tmp_path: Path, clips: dict[str, Path]) -> None:
    video = clips["red_blue"].name
    layouts = [
        {"video": video, "prompt": "Which color comes first?", "chosen": "red", "rejected": "blue"},  # LLaVA-Hound
        {  # LLaMA-Factory sharegpt pairwise
            "videos": [video],
            "conversations": [{"from": "human", "value": "<video>Which color comes first?"}],
            "chosen": {"from": "gpt", "value": "red"},
            "rejected": {"from": "gpt", "value": "blue"},
        },
        {  # ms-swift
            "videos": [video],
            "messages": [
                {"role": "user", "content": "<video>Which color comes first?"},
                {"role": "assistant", "content": "red"},
            ],
            "chosen": "red",
            "rejected_response": "blue",
        },
    ]
    for index, layout in enumerate(layouts):
        path = write_jsonl(tmp_path / f"p{index}.jsonl", [layout])
        row = next(iter_conversations(SourceConfig(path=str(path), media_root=str(clips["red_blue"].parent))))
        assert row["rejected"] == "blue", index
        assert assistant_texts(row["messages"]) == ["red"], index
        user = row["messages"][0]["content"]
        assert [p["type"] for p in user] == ["video", "text"] and user[1]["text"] == "Which color comes first?"


def test_chosen_equal_to_rejected_is_a_bad_row_within_the_budget(
    tmp_path: Path, demo_corpus: Path, builder, tiny_model_dir: Path
) -> None:
    pairs = [json.loads(line) for line in (demo_corpus / "preferences_train.jsonl").read_text().splitlines()][:8]
    pairs[3] = {**pairs[3], "rejected": pairs[3]["chosen"]}
    path = write_jsonl(demo_corpus / "pairs_one_bad.jsonl", pairs)
    rows = load_conversations([SourceConfig(path=str(path))], keep_bad=True)
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], sampling=SamplingConfig(num_frames=4), max_length=64)
    tolerant = BadSampleConfig(max_bad_fraction=0.2)
    kept, report = measure_and_filter(rows, Measurer(builder, cfg), BadSampleLog(tolerant))
    assert len(kept) == 7 and len(report.bad.bad) == 1
    where, reason = report.bad.bad[0]
    assert where.endswith("line 4") and "chosen and rejected answers are the same" in reason
    with pytest.raises(DataError, match="nothing to prefer"):  # the default budget (5%) refuses 1 in 8
        measure_and_filter(rows, Measurer(builder, cfg), BadSampleLog(BadSampleConfig()))


def fixed_log_probs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: -torch.rand(4, generator=generator) * 10
        for name in ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")
    }


def test_dpo_loss_equals_a_hand_computation() -> None:
    lp = fixed_log_probs()
    chosen_tokens, rejected_tokens = torch.tensor([1.0, 2, 3, 4]), torch.tensor([2.0, 2, 1, 5])
    for loss_type in ("sigmoid", "ipo", "sigmoid_norm"):
        settings = DPOSettings(beta=0.3, loss_type=loss_type)
        loss, chosen_reward, rejected_reward = dpo_loss(*lp.values(), settings, chosen_tokens, rejected_tokens)
        for i in range(4):
            chosen_ratio = float(lp["policy_chosen"][i] - lp["reference_chosen"][i])
            rejected_ratio = float(lp["policy_rejected"][i] - lp["reference_rejected"][i])
            if loss_type == "sigmoid":
                expected = math.log(1 + math.exp(-0.3 * (chosen_ratio - rejected_ratio)))
            else:
                delta = chosen_ratio / float(chosen_tokens[i]) - rejected_ratio / float(rejected_tokens[i])
                expected = (delta - 1 / 0.6) ** 2 if loss_type == "ipo" else math.log(1 + math.exp(-0.3 * delta))
            assert float(loss[i]) == pytest.approx(expected, rel=1e-5), (loss_type, i)
            assert float(chosen_reward[i]) == pytest.approx(0.3 * chosen_ratio, rel=1e-5)
            assert float(rejected_reward[i]) == pytest.approx(0.3 * rejected_ratio, rel=1e-5)


def trl_dpo_loss(per_token: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, loss_type: str, beta: float):
    """TRL 1.16's own DPOTrainer._compute_loss on given per-token log-probs (a stub model returns them)."""
    from trl import DPOTrainer

    two_p, width = per_token.shape
    outputs = SimpleNamespace(
        log_probs=per_token * mask,
        entropy=torch.zeros(two_p, width),
        mean_logits=torch.zeros(two_p, width),
        is_top1=torch.zeros(two_p, width, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t)
    trainer = SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    # completion_mask is one longer than the per-token log-probs (TRL shifts it by one)
    completion_mask = torch.nn.functional.pad(mask, (1, 0))
    inputs = {
        "input_ids": torch.zeros(two_p, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(two_p, width + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": reference.chunk(2)[0],
        "ref_rejected_logps": reference.chunk(2)[1],
    }
    return DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)


def test_dpo_loss_equals_trls_on_the_same_log_probs() -> None:
    generator = torch.Generator().manual_seed(1)
    per_token = -torch.rand(6, 5, generator=generator) * 3  # 3 pairs: chosen rows 0-2, rejected rows 3-5
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]] * 2, dtype=torch.float32)
    mask[4, 4] = 1  # different lengths for chosen and rejected
    reference = -torch.rand(6, generator=generator) * 8
    summed, tokens = (per_token * mask).sum(1), mask.sum(1)
    for loss_type in ("sigmoid", "ipo", "sigmoid_norm"):
        settings = DPOSettings(beta=0.2, loss_type=loss_type)
        ours, _, _ = dpo_loss(*summed.chunk(2), *reference.chunk(2), settings, *tokens.chunk(2))
        theirs = trl_dpo_loss(per_token, mask, reference, loss_type, 0.2)
        assert float(ours.mean()) == pytest.approx(float(theirs), rel=1e-5), loss_type


def pair_batch(kit, corpus: Path, num_pairs: int = 2) -> dict:
    from tests.conftest import TINY_MAX_LENGTH
    from vidtune.data.collator import Collator
    from vidtune.data.packing import NUM_SAMPLES, NUM_TOKENS
    from vidtune.data.preference import PairCollator, PairMaker

    rows = load_conversations([SourceConfig(path=str(corpus / "preferences_train.jsonl"))])
    maker = PairMaker(
        kit.builder,
        DataConfig(sampling=SamplingConfig(num_frames=4), max_length=TINY_MAX_LENGTH.get(kit.name, 64)),
        0,
        train=False,
    )
    collate = PairCollator(Collator(kit.processor.tokenizer.pad_token_id, family=kit.family))
    batch = collate([maker.make(rows[i], 0, i) for i in range(num_pairs)])
    assert batch.pop(NUM_SAMPLES) == num_pairs and batch.pop(NUM_TOKENS) > 0
    return batch


def test_reference_log_probs_with_the_adapter_disabled_equal_the_base_models(family_kits, demo_corpus: Path) -> None:
    from contextlib import nullcontext

    from vidtune.train.objectives.base import adapter_disabled
    from vidtune.train.training.config import FinetuneConfig
    from vidtune.train.training.loss import language_head
    from vidtune.train.training.model import apply_finetuning, model_class

    kit = family_kits("llava_next_video")
    batch = pair_batch(kit, demo_corpus)

    def fresh_base():
        model = model_class(kit.family).from_pretrained(kit.model_dir).eval()
        kit.family.prepare_model(model)
        return model

    policy = apply_finetuning(fresh_base(), kit.family, FinetuneConfig(mode="lora"))
    torch.manual_seed(0)
    for name, weight in policy.named_parameters():
        if "lora_B" in name:  # a fresh adapter is a no-op (B = 0): make it change the answers' log-probs
            weight.data.normal_(0, 0.5)
    objective = DPOObjective(DPOSettings(), language_head(policy), nullcontext)
    with torch.no_grad():
        trained, tokens = objective.sequence_logps(policy, batch)
        with adapter_disabled(policy):
            reference, _ = objective.sequence_logps(policy, batch)
        base = fresh_base()
        separately, _ = DPOObjective(DPOSettings(), language_head(base), nullcontext).sequence_logps(base, batch)
        full_logits, _ = DPOObjective(DPOSettings(), None, nullcontext).sequence_logps(base, batch)  # ZeRO-3 path
    assert torch.equal(tokens, (batch["labels"][:, 1:] != -100).sum(1).float())
    torch.testing.assert_close(reference, separately, rtol=0, atol=1e-5)
    torch.testing.assert_close(full_logits, separately, rtol=0, atol=1e-5)
    assert (trained - separately).abs().max() > 1e-2  # the adapter was on for the policy's pass


def test_answer_log_probs_equal_the_full_logits_for_every_family(family_kit, demo_corpus: Path) -> None:
    """DPO's and GRPO's per-answer log-probs come from the language head's captured input (no full logits): they
    equal the model's own logits at the answer tokens for every family. Qwen2.5-Omni's thinker ignores
    logits_to_keep, so its head saw every position: taken as they were, rows and targets did not line up."""
    from contextlib import nullcontext

    from vidtune.train.training.loss import language_head

    batch = pair_batch(family_kit, demo_corpus)
    model = family_kit.model
    with torch.no_grad():
        captured, tokens = DPOObjective(DPOSettings(), language_head(model), nullcontext).sequence_logps(model, batch)
        full_logits, _ = DPOObjective(DPOSettings(), None, nullcontext).sequence_logps(model, batch)
    assert tokens.min() > 0 and captured.isfinite().all()
    torch.testing.assert_close(captured, full_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
@pytest.mark.parametrize("family", ["qwen2_5_omni", "gemma4"])
def test_dpo_and_grpo_train_on_clips_heard_with_their_sound(
    family: str, objective: str, family_kits, tmp_path: Path, monkeypatch
) -> None:
    """The families that hear run a DPO or GRPO step on the tone clips with their sound: the examples carry the
    audio (the family's encode_with_audio builds them), and the step's figures are finite."""
    from tests.conftest import tiny_run_overrides
    from vidtune.train.demo.corpus import write_tone_corpus
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    kit = family_kits(family)
    heard = []
    encode = type(kit.family).encode_with_audio
    monkeypatch.setattr(type(kit.family), "encode_with_audio", lambda *a, **k: heard.append(1) or encode(*a, **k))
    corpus = write_tone_corpus(tmp_path / "tones", num_train=4, num_eval=2)
    rows = [json.loads(line) for line in (corpus / "tones_train.jsonl").read_text().splitlines()]
    other = {"high": "low", "low": "high"}
    pairs = write_jsonl(
        corpus / "pairs.jsonl", [{**r, "chosen": r["answer"], "rejected": other[r["answer"]]} for r in rows]
    )
    settings = {
        "dpo": ["train.objective=dpo", f"data.sources=[{{path: {pairs}}}]"],
        "grpo": ["train.objective=grpo", "train.grpo.num_generations=2", "train.grpo.max_new_tokens=3"],
    }[objective]
    overrides = tiny_run_overrides(
        kit.model_dir,
        corpus,
        tmp_path / "run",
        f"data.sources=[{{path: {corpus / 'tones_train.jsonl'}}}]",
        *settings,
        "data.max_length=1024",
        "train.max_steps=1",
        "train.batch_size=2",
    )
    output = train(load_recipe(None, overrides))
    logged = [m for m in read_metrics(output) if "train/loss" in m]
    assert heard and len(logged) == 1 and all(math.isfinite(v) for v in logged[0].values())


def test_dpo_training_run_prefers_the_chosen_answers(family_kits, demo_corpus: Path, tmp_path: Path) -> None:
    from tests.conftest import tiny_run_overrides
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    # A preference a few steps can learn from a random model (the order question needs the demo's trained base):
    # "red" over "blue", whatever the clip.
    rows = [json.loads(line) for line in (demo_corpus / "preferences_train.jsonl").read_text().splitlines()]
    path = write_jsonl(demo_corpus / "red_over_blue.jsonl", [{**r, "chosen": "red", "rejected": "blue"} for r in rows])
    overrides = tiny_run_overrides(
        family_kits("llava_next_video").model_dir,
        demo_corpus,
        tmp_path / "dpo",
        f"data.sources=[{{path: {path}}}]",
        "train.objective=dpo",
        "train.dpo.beta=0.5",
    )
    output = train(load_recipe(None, overrides))
    logged = [m for m in read_metrics(output) if "train/rewards/margin" in m]
    assert len(logged) == 6
    assert logged[0]["train/rewards/margin"] == pytest.approx(0, abs=1e-6)  # step 1: policy = reference
    assert logged[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logged[-1]["train/rewards/margin"] > 0.05 and logged[-1]["train/loss"] < math.log(2)
    assert logged[-1]["train/rewards/accuracy"] == 1
    assert (output / "adapter_model.safetensors").is_file()
    # the preference-tuned adapter exports and answers as an SFT adapter does: the export's greedy answers are the
    # run's, and the run's are not the base model's
    from vidtune.train.generation.infer import generate, load_for_inference, video_question
    from vidtune.train.publishing.export import export_folder

    exported = export_folder(output, to=tmp_path / "export")
    assert "adapter_model.safetensors" in exported.files
    prompts = [
        video_question(str(demo_corpus / "videos" / f"eval_{i:04d}.mp4"), "Which color comes first?") for i in (0, 1)
    ]
    answers = generate(load_for_inference(str(output)), prompts, 4)
    assert generate(load_for_inference(str(exported.folder)), prompts, 4) == answers
    assert answers != generate(load_for_inference(str(family_kits("llava_next_video").model_dir)), prompts, 4)


@pytest.mark.parametrize("maker_module", ["vidtune.data.preference:PairMaker", "vidtune.data.rollouts:PromptMaker"])
def test_pairs_and_rollout_prompts_decode_under_the_same_pixel_limit_as_sft(
    family_kits, demo_corpus: Path, maker_module: str
) -> None:
    """Every example maker decodes through ExampleMaker.decode: a frame over data.bad_samples.max_frame_pixels is
    refused before it is decoded, for preference pairs and GRPO prompts as for SFT examples."""
    import importlib

    module, name = maker_module.split(":")
    maker_class = getattr(importlib.import_module(module), name)
    kit = family_kits("llava_next_video")
    file = "preferences_train.jsonl" if name == "PairMaker" else "questions_train.jsonl"
    row = load_conversations([SourceConfig(path=str(demo_corpus / file))])[0]
    limits = BadSampleConfig(max_frame_pixels=16)  # the demo clips are far larger than 16 pixels a frame
    data = DataConfig(sampling=SamplingConfig(num_frames=4), max_length=512, bad_samples=limits)
    with pytest.raises(DataError, match="pixel"):
        maker_class(kit.builder, data, 0, train=False).make(row, 0, 0)
    maker_class(kit.builder, DataConfig(sampling=SamplingConfig(num_frames=4), max_length=512), 0, train=False).make(
        row, 0, 0
    )


def test_vidtune_check_counts_pairs_and_checks_grpo_rewards_and_prompt_room(
    tiny_model_dir: Path, demo_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dpo: pairs counted, a training row without a rejected answer fails the check (training refuses it); grpo:
    the rewards resolved, prompts that leave no room for max_new_tokens within max_length named with the fix."""
    from vidtune.train.cli import main

    pairs = [json.loads(line) for line in (demo_corpus / "preferences_train.jsonl").read_text().splitlines()][:6]
    rows = pairs
    unpaired = {"video": rows[0]["video"], "question": "Which color comes first?", "answer": "red"}

    def check(objective: str, sources: list[Path], **extra: object) -> tuple[int, dict, str]:
        recipe = tmp_path / f"{objective}.yaml"
        listed = [{"path": str(p), "media_root": str(demo_corpus)} for p in sources]
        data = {"sources": listed, "sampling": {"num_frames": 4}, "max_length": 64}
        train = {"output_dir": str(tmp_path / "out"), "objective": objective, **extra}
        recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "train": train, "data": data}))
        out = tmp_path / f"{objective}.json"
        try:
            main(["check", str(recipe), "--out", str(out)])
            code = 0
        except SystemExit as exit_info:
            code = int(exit_info.code or 0)
        printed = capsys.readouterr().out
        return code, json.loads(out.read_text())["objective"], printed

    paired = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, report, printed = check("dpo", [paired])
    assert code == 0 and report == {"objective": "dpo", "pairs": 6, "rows_without_rejected": []}
    assert "dpo pairs       6 (chosen + rejected)" in printed
    code, report, printed = check("dpo", [paired, write_jsonl(tmp_path / "qa.jsonl", [unpaired])])
    assert code == 1 and report["pairs"] == 6 and report["rows_without_rejected"] == ["qa.jsonl line 1"]
    assert "FAIL: 1 training rows have no rejected answer" in printed

    questions = write_jsonl(tmp_path / "questions.jsonl", [unpaired])
    grpo = {"grpo": {"rewards": ["exact", "vidtune.train.objectives.rewards:choice_reward"], "max_new_tokens": 4}}
    code, report, printed = check("grpo", [questions], **grpo)
    prompt = report["prompt_tokens"]["max"]
    assert code == 0 and report["prompts"] == 1 and report["prompts_without_room"] == []
    assert report["rewards"] == {
        "exact": "built-in",
        "vidtune.train.objectives.rewards:choice_reward": "vidtune.train.objectives.rewards.choice_reward",
    }
    assert 10 < prompt < 64 - 4 and report["max_length_for_all"] == prompt + 4
    code, report, printed = check("grpo", [questions], grpo={**grpo["grpo"], "max_new_tokens": 64 - prompt + 1})
    assert code == 0 and report["prompts_without_room"] == [{"where": "questions.jsonl line 1", "tokens": prompt}]
    assert f"data.max_length={prompt + 64 - prompt + 1} fits every prompt" in printed


def red_over_blue_pairs(clips: dict[str, Path], clip_pairs: int, text_only: int = 0) -> Path:
    """The clip's question with chosen "red", rejected "blue" (`clip_pairs` times), then `text_only` pairs without
    media; written beside the clip (its media root)."""
    clip = {"video": clips["red_blue"].name, "prompt": "Which color comes first?", "chosen": "red", "rejected": "blue"}
    rows = [clip] * clip_pairs
    rows += [{"prompt": f"Say a colour ({i}).", "chosen": "red", "rejected": "blue"} for i in range(text_only)]
    return write_jsonl(clips["red_blue"].parent / f"red_over_blue_{clip_pairs}_{text_only}.jsonl", rows)


def full_fine_tuning_overrides(family_kits, demo_corpus: Path, output: Path, source: Path, *extra: str) -> list[str]:
    from tests.conftest import tiny_run_overrides

    return tiny_run_overrides(
        family_kits("llava_next_video").model_dir,
        demo_corpus,
        output,
        f"data.sources=[{{path: {source}}}]",
        "finetune.mode=full",
        "train.learning_rate=1e-3",
        *extra,
    )


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_full_fine_tuning_compares_with_a_frozen_copy_of_the_start(
    objective: str, family_kits, demo_corpus: Path, clips: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """finetune.mode=full trains every language-model weight, so there is no adapter to switch off: the reference
    is a frozen copy of the starting model. DPO's first step sees policy == reference (margin 0, loss log 2), then
    the margin grows (a reference that trained along would keep it at 0); GRPO's KL to it is 0 at the first step and
    grows. The run saves a whole model, not an adapter."""
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    source = red_over_blue_pairs(clips, 4) if objective == "dpo" else demo_corpus / "questions_train.jsonl"
    settings = {
        "dpo": ["train.objective=dpo", "train.dpo.beta=0.5", "train.batch_size=2"],
        "grpo": [
            "train.objective=grpo",
            "train.grpo.beta=0.1",
            "train.grpo.num_generations=2",
            "train.grpo.max_new_tokens=4",
            "train.grpo.rewards=[tests.test_grpo:varied_reward]",
            "train.batch_size=2",
        ],
    }[objective]
    output = train(load_recipe(None, full_fine_tuning_overrides(family_kits, demo_corpus, tmp_path, source, *settings)))
    assert "reference: a frozen copy of the starting model" in capsys.readouterr().out
    assert (output / "model.safetensors").is_file() and not (output / "adapter_model.safetensors").exists()
    logged = [m for m in read_metrics(output) if "train/loss" in m and "train/lr" in m]
    assert len(logged) == 6
    if objective == "dpo":
        assert logged[0]["train/rewards/margin"] == 0 and logged[0]["train/loss"] == pytest.approx(math.log(2))
        assert logged[-1]["train/rewards/margin"] > 0.5 and logged[-1]["train/rewards/accuracy"] == 1
    else:
        assert logged[0]["train/kl"] == 0 and logged[-1]["train/kl"] > 0


@pytest.mark.slow
def test_zero3_full_fine_tuning_dpo_partitions_its_reference_and_equals_one_process(
    family_kits, demo_corpus: Path, clips: dict[str, Path], tmp_path: Path
) -> None:
    """2 processes under ZeRO-3, full fine-tuning: the frozen reference is partitioned like the policy (an inference
    engine; its vision lockstep runs a blank clip on the rank holding a text-only pair while the other holds the
    clip: 1 clip pair and 3 text-only pairs put them side by side at some step), no rank hangs, and the losses and
    margins are the 1-process run's at every step (the same global batch)."""
    from tests.test_distributed import engine, launch
    from vidtune.train.training.config import load_recipe, recipe_to_yaml
    from vidtune.train.training.loop import train
    from vidtune.train.training.tracking import read_metrics

    source = red_over_blue_pairs(clips, 1, text_only=3)

    def overrides(output: Path, *extra: str) -> list[str]:
        return full_fine_tuning_overrides(
            family_kits, demo_corpus, output, source, "train.objective=dpo", "train.dpo.beta=0.5",
            "train.batch_size=1", "train.max_steps=2", "train.adam_epsilon=1e-3", *extra,
        )  # fmt: skip

    def figures(output: Path) -> list[tuple[float, float]]:
        return [(m["train/loss"], m["train/rewards/margin"]) for m in read_metrics(output) if "train/lr" in m]

    path = tmp_path / "two.yaml"
    path.write_text(recipe_to_yaml(load_recipe(None, overrides(tmp_path / "two"))))
    result = launch(path, "zero3.yaml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert engine(tmp_path / "two") == {"num_processes": 2, "distributed_type": "DEEPSPEED", "zero_stage": 3}
    train(load_recipe(None, overrides(tmp_path / "one", "train.grad_accum_steps=2")))
    ours, theirs = figures(tmp_path / "two"), figures(tmp_path / "one")
    assert len(ours) == len(theirs) == 2 and theirs[-1][1] > 0
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-6)


def test_a_full_fine_tuning_reference_under_fsdp_is_refused_before_any_model_loads() -> None:
    """FSDP would hold the frozen copy whole on every rank: one line, naming the launcher that partitions it."""
    import types

    from accelerate.utils import DistributedType

    from vidtune.train.objectives.reference import refuse_unsharded_copy
    from vidtune.train.training.config import RecipeError, load_recipe

    base = ["model.name_or_path=m", "data.sources=[{path: rows.jsonl}]", "train.output_dir=out", "finetune.mode=full"]
    fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(RecipeError, match=r"finetune.mode=full under FSDP: .* launch/accelerate/zero3.yaml"):
        refuse_unsharded_copy(load_recipe(None, [*base, "train.objective=dpo"]), fsdp)
    refuse_unsharded_copy(load_recipe(None, [*base, "train.objective=grpo", "train.grpo.beta=0"]), fsdp)  # no KL
    refuse_unsharded_copy(load_recipe(None, [*base, "train.objective=dpo", "finetune.mode=lora"]), fsdp)  # adapter off
