"""Sequence parallelism (train.sequence_parallel, DeepSpeed Ulysses): 2 CPU processes (gloo) launched as the README
launches them give the 1-process run's losses, gradient norms and adapter, with each rank's vision tower encoding
half of the frames; the pieces (frame shares, batch repetition, recipe checks) alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.test_distributed import engine, launch, losses
from vidtune.train.training.config import RecipeError, load_recipe, recipe_to_yaml
from vidtune.train.training.tracking import read_metrics

NUM_SAMPLES = 6  # 3 optimizer steps of 2 micro-batches of 1 sample
NUM_FRAMES = 4


def overrides(model: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"data.sources=[{{path: {corpus / 'questions_train.jsonl'}, num_samples: {NUM_SAMPLES}}}]",
        f"data.sampling.num_frames={NUM_FRAMES}",
        "data.max_length=96",
        "data.num_workers=0",
        f"train.output_dir={output}",
        "train.max_steps=3",
        "train.batch_size=1",
        "train.grad_accum_steps=2",
        "train.learning_rate=1e-2",
        # Adam divides each update by its gradient's size: at eps 1e-8 a near-zero gradient, summed across the group
        # in another order, moves by up to a whole step either way; 1e-3 keeps those steps as small as the gradient
        "train.adam_epsilon=1e-3",
        "train.warmup_ratio=0",
        "train.log_every_steps=1",
        "train.group_by_length=false",
        "train.mixed_precision=no",
        "finetune.lora.dropout=0",
        "finetune.train_projector=true",  # the gathered features' gradient reaches the projector / merger
        "logging.report_to=none",
        *extra,
    ]


def grad_norms(output: Path) -> list[float]:
    return [m["train/grad_norm"] for m in sorted(read_metrics(output), key=lambda m: m["step"]) if "train/loss" in m]


def assert_same_run(split: Path, single: Path, processes: int, stage: int) -> None:
    """The split run (`processes`, ZeRO `stage`) logged the 1-process run's per-step losses and gradient norms
    (Adam hides a gradient's scale from the losses; the norm does not) and saved its weights, rtol 1e-4; atol: float
    noise of the gradients' summation order, which adam_epsilon 1e-3 keeps from growing into steps."""
    assert engine(split) == {"num_processes": processes, "distributed_type": "DEEPSPEED", "zero_stage": stage}
    ours, theirs = losses(split), losses(single)
    assert len(ours) == len(theirs) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(grad_norms(split)), torch.tensor(grad_norms(single)), rtol=1e-4, atol=0)
    ours_saved, theirs_saved = saved_weights(split), saved_weights(single)
    assert ours_saved.keys() == theirs_saved.keys()
    for key, tensor in theirs_saved.items():
        worst = (ours_saved[key] - tensor).abs().max().item()
        torch.testing.assert_close(ours_saved[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{key}: max diff {worst:.2e}")


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_config.json").is_file() else "model.safetensors"
    return load_file(str(folder / name))


PACKED = ("train.packing=true", "train.batch_size=2", "train.grad_accum_steps=1")  # 2 samples in each sequence


def split_cases():
    """Family x packing x LoRA/full x ZeRO-2/3. CI runs LoRA under ZeRO-2 for both families, packed and unpacked
    (test_zero3_full_... below adds full fine-tuning under ZeRO-3); VIDTUNE_SP_MATRIX=1 runs the other 12 too."""
    for family in ("llava_next_video", "qwen2_5_vl"):
        for packing in ("unpacked", "packed"):
            for mode in ("lora", "full"):
                for config in ("zero2.yaml", "zero3.yaml"):
                    in_ci = mode == "lora" and config == "zero2.yaml"
                    opt_in = pytest.mark.skipif(
                        os.environ.get("VIDTUNE_SP_MATRIX") != "1",
                        reason="opt-in: set VIDTUNE_SP_MATRIX=1 for the whole family x packing x mode x ZeRO matrix",
                    )
                    name = f"{family}-{packing}-{mode}-{config.removesuffix('.yaml')}"
                    yield pytest.param(family, packing, mode, config, id=name, marks=[] if in_ci else [opt_in])


@pytest.mark.slow
@pytest.mark.parametrize(("family", "packing", "mode", "config"), list(split_cases()))
def test_two_ranks_share_each_sample_and_match_one_process(
    family, packing, mode, config, family_kits, demo_corpus, tmp_path
):
    """SP 2 (one group: data parallel 1) against 1 process on the same samples: per-step losses, gradient
    norms and the saved weights equal (Qwen2.5-VL: 3-D multimodal RoPE positions computed on the whole sequence);
    each rank's vision tower got half of every micro-batch's frames. Packed: two samples share each sequence the
    group splits, each attending only to itself (a sample attending to the one before it changes the losses), against
    the 1-process packed run (rows with sdpa's block mask)."""
    from vidtune.train.training.loop import train

    model = family_kits(family).model_dir
    extra = (*(PACKED if packing == "packed" else ()), f"finetune.mode={mode}")
    train(load_recipe(None, overrides(model, demo_corpus, tmp_path / "one", *extra)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_to_yaml(load_recipe(None, overrides(model, demo_corpus, tmp_path / "two", *extra))))
    probe = tmp_path / "frames"
    probe.mkdir()
    result = launch(recipe, config, "train.sequence_parallel=2", fault=f"towerframes@{probe}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert_same_run(tmp_path / "two", tmp_path / "one", processes=2, stage=3 if config == "zero3.yaml" else 2)

    frames = {rank: [int(n) for n in (probe / f"rank{rank}.txt").read_text().split()] for rank in (0, 1)}
    per_sequence = 2 if packing == "packed" else 1
    # once per frame across the group: half of each sequence's frames per rank
    assert frames[0] == frames[1] == [per_sequence * NUM_FRAMES // 2] * (NUM_SAMPLES // per_sequence)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("VIDTUNE_FOUR_PROCESSES") != "1",
    reason="set VIDTUNE_FOUR_PROCESSES=1: 4 processes on CI's 2 cores exceed the suite's time budget",
)
@pytest.mark.parametrize("family", ["llava_next_video", "qwen2_5_vl"])
def test_two_groups_of_two_match_one_process_on_the_same_global_batch(family, family_kits, demo_corpus, tmp_path):
    """World 4 = data parallel 2 x sequence parallel 2 (ZeRO-2, batch_size 1, grad_accum 1: each step the two groups
    read different samples, 2 in all) against 1 process at grad_accum 2 (the same 2 samples per step, in the same
    order: group g reads batch 2s+g, as the one process's micro-batch g of step s): per-step losses, gradient norms
    and the saved adapter equal. Adam's epsilon at 1e-3 keeps float-noise of near-zero gradients (reduced in another
    order) from being amplified into steps."""
    from vidtune.train.training.loop import train

    model = family_kits(family).model_dir
    train(load_recipe(None, overrides(model, demo_corpus, tmp_path / "one")))  # overrides: adam_epsilon 1e-3
    recipe = tmp_path / "recipe.yaml"
    settings = overrides(model, demo_corpus, tmp_path / "four", "train.grad_accum_steps=1")
    recipe.write_text(recipe_to_yaml(load_recipe(None, settings)))
    result = launch(recipe, "zero2.yaml", "train.sequence_parallel=2", processes=4)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert_same_run(tmp_path / "four", tmp_path / "one", processes=4, stage=2)


def test_features_gather_within_each_group_of_a_data_parallel_world(tmp_path):
    """World 4 = 2 groups of 2 on gloo: each group gathers its own ranks' feature rows, and each share's gradient is
    the sum over its group's ranks (both computed the same loss: 2x the weights). torch's autograd all_gather failed
    here on gloo in the group {2, 3} (its backward passes group ranks as global ones)."""
    from tests.group_gather import gather_in_second_group

    torch.multiprocessing.spawn(gather_in_second_group, (f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=4)
    weights = torch.arange(1.0, 10.0).reshape(3, 3)
    for rank in range(4):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        first = rank // 2 * 2 + 1  # the group's rank-0 fill value
        expected = torch.cat([torch.full((2, 3), float(first)), torch.full((1, 3), float(first + 1))])
        torch.testing.assert_close(result["gathered"], expected, rtol=0, atol=0)
        share = weights[:2] if rank % 2 == 0 else weights[2:]
        torch.testing.assert_close(result["grad"], 2 * share, rtol=0, atol=0)


@pytest.mark.slow
def test_zero3_full_fine_tuning_splits_like_one_process_and_resumes_bit_exact(family_kits, demo_corpus, tmp_path):
    """Qwen2.5-VL (multimodal RoPE), full fine-tuning, ZeRO-3 (partitioned weights gathered per layer inside the
    split forward), SP 2: per-step losses and gradient norms of the 1-process run (rtol 1e-4) and its saved weights.
    Killed (SIGKILL) at the first micro-batch after the step-2 checkpoint and relaunched, the run resumes it and ends
    with the uninterrupted SP run's losses and weights, bit for bit."""
    from vidtune.train.training.loop import train

    model = family_kits("qwen2_5_vl").model_dir
    full = ("finetune.mode=full", "train.save_every_steps=2")
    train(load_recipe(None, overrides(model, demo_corpus, tmp_path / "one", *full)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_to_yaml(load_recipe(None, overrides(model, demo_corpus, tmp_path / "two", *full))))
    result = launch(recipe, "zero3.yaml", "train.sequence_parallel=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_run(tmp_path / "two", tmp_path / "one", processes=2, stage=3)

    output = tmp_path / "killed"
    killed = launch(recipe, "zero3.yaml", "train.sequence_parallel=2", f"train.output_dir={output}", fault="kill@2.0")
    assert killed.returncode != 0 and not (output / "vidtune.json").exists()
    assert [p.name for p in (output / "checkpoints").glob("step_*")] == ["step_00000002"]
    resumed = launch(recipe, "zero3.yaml", "train.sequence_parallel=2", f"train.output_dir={output}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert losses(output) == losses(tmp_path / "two")
    again, uninterrupted = saved_weights(output), saved_weights(tmp_path / "two")
    assert again.keys() == uninterrupted.keys() and all(torch.equal(again[k], uninterrupted[k]) for k in again)


@pytest.mark.parametrize("family", ["llava_next_video", "qwen2_5_vl"])
def test_frame_shares_encode_to_the_whole_clips_features(family, family_kits, clips):
    """The features of each share of the frames (the family's video_shares), concatenated, are the features of the
    whole batch's clips: the tower sees each frame (LLaVA) or temporal patch (Qwen) alone."""
    from vidtune.data.conversation import media_part, message, text_part
    from vidtune.data.dataset import load_media
    from vidtune.data.video import SamplingConfig
    from vidtune.train.training.sequence_split import encode_share

    kit = family_kits(family)
    examples = []
    for name, num_frames in (("red_blue", 4), ("three", 6)):
        messages = [
            message("user", [media_part("video", str(clips[name])), text_part("What is it?")]),
            message("assistant", [text_part("colors")]),
        ]
        examples.append(kit.builder.build(messages, load_media(messages, SamplingConfig(num_frames), False, None)[0]))
    batch = kit.family.normalize_pixels(kit.family.batch_visuals(examples), kit.processor)
    video_inputs = {k: batch[k] for k in ("pixel_values_videos", "video_grid_thw") if k in batch}
    with torch.no_grad():
        whole = encode_share(kit.model, video_inputs)
        for parts in (2, 3, 16):
            shares = kit.family.video_shares(video_inputs, parts)
            assert len(shares) == parts
            pieces = [encode_share(kit.model, share.inputs) for share in shares if share.real]
            torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-5, atol=1e-5)
            assert sum(share.weight for share in shares if share.real) == sum(
                share.weight for share in kit.family.video_shares(video_inputs, 1)
            )
    assert not all(s.real for s in kit.family.video_shares(video_inputs, 16))  # more ranks than frames: stand-ins


def test_group_ranks_read_the_same_batches():
    """Sharded per rank as Accelerate shards a batch sampler, the 2 ranks of each sequence-parallel group get the
    same batches and the 2 groups different ones (world 4 = data parallel 2 x sequence parallel 2)."""
    from accelerate.data_loader import BatchSamplerShard

    from vidtune.train.training.sequence_split import RepeatedBatches

    batches = [[i] for i in range(8)]
    per_rank = [list(BatchSamplerShard(RepeatedBatches(batches, 2), 4, rank)) for rank in range(4)]
    assert per_rank[0] == per_rank[1] == [[0], [2], [4], [6]]
    assert per_rank[2] == per_rank[3] == [[1], [3], [5], [7]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.batch_size=2"], "train.batch_size=1"),
        (["data.streaming=true", "train.max_steps=2", "data.eval_fraction=0"], "data.streaming is not supported"),
        (["model.attn_implementation=eager"], "sdpa or flash_attention_2"),
        (["train.sequence_parallel=0"], ">= 1"),
    ],
)
def test_recipe_problems_are_named_before_loading(extra, message):
    base = ["model.name_or_path=x", "train.output_dir=o", "data.sources=[{path: rows.jsonl}]"]
    load_recipe(None, [*base, "train.sequence_parallel=2"])  # valid as it is
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [*base, "train.sequence_parallel=2", *extra])


def test_a_family_that_cannot_split_is_refused(family_kits, tmp_path):
    from vidtune.train.training.build import refuse_unpackable_family

    model = family_kits("qwen3_vl").model_dir
    settings = [f"model.name_or_path={model}", f"train.output_dir={tmp_path}", "data.sources=[{path: rows.jsonl}]"]
    refuse_unpackable_family(load_recipe(None, settings))  # without sequence parallelism: fine
    recipe = load_recipe(None, [*settings, "train.sequence_parallel=2"])
    with pytest.raises(RecipeError, match="qwen3_vl family does not split"):
        refuse_unpackable_family(recipe)


def test_check_reports_tokens_per_gpu_and_the_samples_that_need_it(family_kits, demo_corpus, tmp_path, capsys):
    """`vidtune check --gpu-tokens T` on the demo's questions: tokens per GPU at the recipe's degree, the samples
    longer than T, and the smallest degree that fits every one (consistent with the per-sample token counts)."""
    import json

    from vidtune.train.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        recipe_to_yaml(load_recipe(None, overrides(family_kits("qwen2_5_vl").model_dir, demo_corpus, tmp_path)))
    )
    main(["check", str(recipe), "train.sequence_parallel=2", "--gpu-tokens", "40", "--out", str(tmp_path / "c.json")])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "c.json").read_text())
    tokens, split = report["tokens"], report["sequence_parallel"]
    assert split["size"] == 2 and split["tokens_per_gpu"]["max"] == -(-tokens["max"] // 2)
    assert split["degree_for_all"] == -(-tokens["max"] // 40) >= 2  # the demo's questions are 43 tokens
    assert tokens["min"] > 40 >= -(-tokens["max"] // 2)  # every sample needs SP; at 2 each fits
    assert split["samples_needing_it"] == report["usable"] and split["samples_over_at_size"] == 0
    assert "tokens/GPU" in printed and f"{report['usable']} samples exceed --gpu-tokens 40" in printed


def test_the_memory_plan_splits_activations_across_the_group(family_kits, demo_corpus, tmp_path, capsys):
    """--dry-run at train.sequence_parallel=2 plans half the activations per GPU (the sequence's slice and the
    frames' share; benchmarks/long_video_memory.py compares it with what autograd saved per rank), the rest alike."""
    from vidtune.train.cli import main

    recipe = tmp_path / "recipe.yaml"
    settings = overrides(family_kits("qwen2_5_vl").model_dir, demo_corpus, tmp_path, "finetune.vision_tower=lora")
    recipe.write_text(recipe_to_yaml(load_recipe(None, settings)))
    plans = {}
    for size in (1, 2):
        main(
            [
                "train",
                str(recipe),
                "--dry-run",
                "--num-processes",
                "2",
                "--zero-stage",
                "2",
                f"train.sequence_parallel={size}",
            ]
        )
        lines = capsys.readouterr().out.splitlines()
        plans[size] = {line.split()[0]: float(line.split()[1]) for line in lines[-5:]}
    assert plans[2]["activations"] == pytest.approx(plans[1]["activations"] / 2, rel=0.02)
    assert plans[2]["weights"] == plans[1]["weights"] and plans[2]["optimizer"] == plans[1]["optimizer"]


def test_a_world_the_degree_does_not_divide_is_refused_in_one_line(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vidtune.train.training.sequence_split import parallelism_config

    # a valid degree registers the per-sample sdpa for Ulysses (process-wide): give the other tests theirs back
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])

    recipe = load_recipe(None, ["model.name_or_path=x", "train.output_dir=o", "data.sources=[{path: r.jsonl}]"])
    assert parallelism_config(recipe) is None  # off: Accelerate as without it
    recipe.train.sequence_parallel = 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RecipeError, match="needs a multiple of 2 processes, 3 launched"):
        parallelism_config(recipe)
    monkeypatch.setenv("WORLD_SIZE", "4")
    config = parallelism_config(recipe)
    assert (config.sp_size, config.dp_replicate_size, config.sp_backend) == (2, 2, "deepspeed")


def test_packed_samples_attend_only_to_themselves_under_ulysses():
    """Ulysses drops the attention mask and hands its core attention the gathered sequence: with packed samples
    (positions restarting) the core must attend causally within each sample. Per-sample sdpa equals sdpa with the
    packed block-causal mask (grouped-query heads included), and differs from plain causal attention over the row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vidtune.train.training.sequence_split import per_sample_attention, sample_starts

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])  # three samples: 4, 3 and 5 tokens
    assert sample_starts(positions[0]) == [0, 4, 7]
    query, key, value = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    ours, _ = per_sample_attention(sdpa_attention_forward)(module, query, key, value, None, position_ids=positions)

    sample = torch.tensor([0] * 4 + [1] * 3 + [2] * 5)
    block_causal = (sample[:, None] == sample[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    masked, _ = sdpa_attention_forward(module, query, key, value, block_causal[None, None])
    torch.testing.assert_close(ours, masked, rtol=1e-6, atol=1e-6)
    whole, _ = sdpa_attention_forward(module, query, key, value, None)
    assert not torch.allclose(ours[:, 4:], whole[:, 4:], atol=1e-3)  # the row's causal attention crosses samples
    unpacked, _ = per_sample_attention(sdpa_attention_forward)(
        module, query, key, value, None, position_ids=torch.arange(12)[None]
    )
    torch.testing.assert_close(unpacked, whole)  # one sample: one call, as without packing
    # registered process-wide as sdpa: modules that pass the mask by keyword (Qwen's vision towers) get sdpa's result
    by_keyword, _ = per_sample_attention(sdpa_attention_forward)(module, query, key, value, attention_mask=None)
    torch.testing.assert_close(by_keyword, whole)


def test_a_768_frame_clip_reaches_qwen_whole_within_a_128k_max_length(family_kits, tmp_path):
    """Long clips get through the data path without surprises: 768 frames sampled by presentation time from a 32 s,
    24 fps clip (every frame kept, none repeated or dropped), encoded by Qwen2.5-VL's processor into 384 temporal
    patches whose video tokens are all in the example, the answer labelled at the end, and the sample within a
    128k-token max_length measured at exactly its length (so no truncation and no drop)."""
    import numpy as np

    from vidtune.data.conversation import media_part, message, text_part
    from vidtune.data.dataset import load_media
    from vidtune.data.examples import IGNORE_INDEX
    from vidtune.data.video import SamplingConfig
    from vidtune.train.demo.clips import write_video

    frames = (np.full((32, 32, 3), index % 256, dtype=np.uint8) for index in range(768))
    clip = write_video(tmp_path / "long.mp4", frames, fps=24)
    kit = family_kits("qwen2_5_vl")
    messages = [
        message("user", [media_part("video", str(clip)), text_part("What happens?")]),
        message("assistant", [text_part("grey gets lighter")]),
    ]
    media, _ = load_media(messages, SamplingConfig(768), False, None)
    brightness = np.asarray(media[0].frames, dtype=np.float32).reshape(768, -1).mean(axis=1)
    assert np.abs(brightness - np.arange(768) % 256).max() < 4  # frame i is the clip's frame i (its grey level)
    example = kit.builder.build(messages, media)
    grid = example["video_grid_thw"].tolist()
    assert grid[0][0] == 384  # 2 frames per temporal patch
    video_tokens = int((example["input_ids"] == kit.model.config.video_token_id).sum())
    assert video_tokens == 384 * grid[0][1] * grid[0][2] // 4 > 0  # 2x2 patches merged per token
    labelled = example["input_ids"][example["labels"] != IGNORE_INDEX]
    assert kit.processor.tokenizer.decode(labelled).startswith("grey gets lighter")
    # measured without decoding (what the dataset's length check uses): the example's exact length, within 128k
    predicted = kit.builder.tokens.video_tokens(768, 32, 32)
    count = kit.builder.count(messages, [predicted])
    assert count.total == len(example["input_ids"]) and count.drop_reason(131072) is None
