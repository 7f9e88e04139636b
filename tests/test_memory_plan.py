"""The memory plan (`vidtune train RECIPE --dry-run`): arithmetic over the meta model and the recipe that equals the
real tensors' bytes of a tiny run for weights, gradients and optimizer states, and comes within 25% of the bytes
autograd actually saved for backward (counted with saved-tensor hooks) for activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import FAMILY_NAMES
from vidtune.train.training.config import load_recipe

TOKENS = 64
REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(model_dir, *overrides: str):
    return load_recipe(
        None,
        [
            f"model.name_or_path={model_dir}",
            "train.output_dir=unused",
            "data.sources=[{path: unused.jsonl}]",
            f"data.max_length={TOKENS}",
            "model.dtype=float32",
            *overrides,
        ],
    )


def saved_and_real_bytes(recipe) -> dict[str, int]:
    """One forward + backward + AdamW step of the tiny model as training builds it, on a TOKENS-token sample: the
    bytes of its weights (bitsandbytes' absmax tensors included), gradients, optimizer states, and of the distinct
    storages autograd saved for backward (weights themselves excluded)."""
    from vidtune.train.training.build import build_optimizer
    from vidtune.train.training.loss import ChunkedLoss, language_head
    from vidtune.train.training.model import apply_finetuning, enable_gradient_checkpointing, load_model

    model, family = load_model(recipe.model)
    model = apply_finetuning(model, family, recipe.finetune)
    if recipe.model.gradient_checkpointing or recipe.model.quantization.bits:
        enable_gradient_checkpointing(model)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(5, 60, (1, TOKENS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = ChunkedLoss(language_head(model))(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    optimizer, _ = build_optimizer(recipe, model, total_steps=1)
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    quant_states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    absmax = [q.absmax for q in quant_states] + [q.state2.absmax for q in quant_states if q.nested]
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters())
        + sum(a.numel() * a.element_size() for a in absmax),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
        "optimizer": sum(
            value.numel() * value.element_size()
            for state in optimizer.state.values()
            for key, value in state.items()
            if key != "step"  # a scalar per tensor
        ),
        "activations": sum(saved.values()),
    }


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # LoRA, dropout 0.05
        ("finetune.mode=full",),
        ("model.quantization.bits=4",),  # QLoRA: 4-bit nf4 with double quantization, checkpointing on
        ("model.gradient_checkpointing=true", "model.quantization.bits=4", "model.quantization.double_quant=false"),
        # bitsandbytes' 8-bit AdamW: 8-bit moments for the weights of >= 4096 values, fp32 for the rest (norms)
        ("finetune.mode=full", "train.optimizer=adamw_8bit"),
    ],
    ids=["lora", "full", "qlora", "qlora-single-quant", "full-adamw-8bit"],
)
@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f in ("llava_next_video", "qwen2_5_vl")])
def test_the_plan_equals_the_tiny_runs_tensors_and_its_activations_are_within_25_percent(
    family, family_kits, overrides
):
    from vidtune.train.training.memory_plan import plan_memory
    from vidtune.train.training.model import apply_finetuning, build_on_meta

    recipe = tiny_recipe(family_kits(family).model_dir, *overrides)
    meta, fam = build_on_meta(recipe.model)
    plan = plan_memory(apply_finetuning(meta, fam, recipe.finetune), fam, recipe)
    torch.manual_seed(0)
    real = saved_and_real_bytes(recipe)
    assert (plan.weights, plan.gradients, plan.optimizer) == (real["weights"], real["gradients"], real["optimizer"])
    assert plan.activations == pytest.approx(real["activations"], rel=0.25)


@pytest.mark.slow
def test_the_zero3_plan_equals_the_tensors_deepspeed_holds_on_each_of_two_ranks(tiny_model_dir):
    """2 CPU processes under launch/accelerate/zero3.yaml, one LoRA bf16 step (benchmarks/training_memory.py's rank
    worker): on each rank, the bytes of DeepSpeed's weight partitions plus the small weights it keeps whole (LoRA's
    in fp32: peft upcasts them), of its gradient partitions (bf16), and of its fp32 master partition (made even
    from those fp32 LoRA weights) with AdamW's moments equal the `--num-processes 2 --zero-stage 3` plan's parts."""
    case = "LoRA bf16"
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import training_memory
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    planned = training_memory.planned_parts(tiny_model_dir, "zero3.yaml", 2, case)
    ranks = training_memory.sharded_launch(tiny_model_dir, 2, "zero3.yaml", 2, case)
    assert [(r["rank"], r["processes"], r["engine"]) for r in ranks] == [(0, 2, "ZeRO-3"), (1, 2, "ZeRO-3")]
    for rank in ranks:
        assert [rank["weights"], rank["gradients"], rank["optimizer"]] == planned, rank


def test_dry_run_prints_a_memory_section_that_follows_quantization_and_zero(tiny_model_dir, demo_corpus, capsys):
    from vidtune.train.cli import main

    def plan(*extra: str) -> dict[str, float]:
        recipe = ["train", "demo/instruct", f"model.name_or_path={tiny_model_dir}", "--dry-run", *extra]
        main(recipe)
        out = capsys.readouterr().out
        section = out[out.index("memory (per GPU, GB") :].splitlines()[1:]
        return {line.split()[0]: float(line.split()[1]) * 1024**3 for line in section if line.strip()}

    lora, qlora = plan(), plan("model.quantization.bits=4")
    sharded = plan("--num-processes", "2", "--zero-stage", "3")
    assert set(lora) >= {"weights", "gradients", "optimizer", "activations", "total"}
    # every rank runs its own micro-batch, with the model's own loss under ZeRO-3: full fp32 logits
    assert sharded["activations"] > lora["activations"]
    assert qlora["weights"] < 0.85 * lora["weights"]  # (unquantized embeddings weigh much when tiny)
    assert qlora["gradients"] == lora["gradients"] and qlora["optimizer"] == lora["optimizer"]
    # ZeRO-2 and ZeRO-3 split the fp32 gradients and DeepSpeed's fp32 masters + AdamW's two moments (12 bytes per
    # trainable value, 1.5x AdamW's 8); ZeRO-3 also splits the weights, but keeps every weight of <= 100k values whole
    # on each rank (most of a tiny model's; the 2-rank launch test above checks the exact bytes)
    zero2 = plan("--num-processes", "2", "--zero-stage", "2")
    for planned in (zero2, sharded):  # 4 significant digits printed
        assert planned["gradients"] == pytest.approx(lora["gradients"] / 2, rel=1e-3)
        assert planned["optimizer"] == pytest.approx(lora["optimizer"] * 1.5 / 2, rel=1e-3)
    assert zero2["weights"] == lora["weights"] and lora["weights"] / 2 < sharded["weights"] < lora["weights"] * 2


def test_gpu_memory_says_whether_the_plan_fits_and_which_changes_would(tiny_model_dir, demo_corpus, capsys):
    """`--dry-run --gpu-memory SIZE`: each suggested change's figure is the plan of the recipe with that override
    typed (so following the advice gives what it promised), a change that fits is marked, a budget the plan meets
    says yes, and a bad size or a missing --dry-run is one line before any model is built."""
    from vidtune.train.cli import main

    base = ["train", "demo/instruct", f"model.name_or_path={tiny_model_dir}", "--dry-run"]

    def total(*extra: str) -> float:
        main([*base, *extra])
        out = capsys.readouterr().out
        memory = out[out.index("memory (per GPU") :]
        return float(memory[memory.index("  total") :].split()[1])

    plain = total()
    main([*base, "--gpu-memory", f"{plain * 10}GB"])
    roomy = capsys.readouterr().out
    assert f"per GPU: yes (plan {plain:.4g} GB)" in roomy and "what lowers it" not in roomy
    budget = total("model.gradient_checkpointing=true") * 1.001  # what checkpointing reaches, and no more
    main([*base, "--gpu-memory", f"{budget}GB"])
    out = capsys.readouterr().out
    advice = out[out.index("\nfits ") :]
    assert f"per GPU: no (plan {plain:.4g} GB)" in advice
    rows = {line.split()[0]: line for line in advice.splitlines() if line.startswith("    ")}
    assert set(rows) >= {"model.gradient_checkpointing=true", "train.optimizer=adamw_8bit", "model.quantization.bits=4"}
    for line in rows.values():
        override, figure = line.split(" GB")[0].rsplit(maxsplit=1)
        assert float(figure) == pytest.approx(total(*override.split()), rel=1e-3), line  # 4 significant digits
        assert line.endswith("fits") == (float(figure) <= budget), line
    assert rows["model.gradient_checkpointing=true"].endswith("fits")
    assert "together:" not in advice  # one change alone fits: no need to stack them
    for bad, message in (("lots", "give a size in GB"), ("0GB", "positive size")):
        with pytest.raises(SystemExit):
            main([*base, "--gpu-memory", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "demo/instruct", f"model.name_or_path={tiny_model_dir}", "--gpu-memory", "24GB"])
    assert "add --dry-run" in capsys.readouterr().err


@pytest.mark.parametrize(("processes", "zero_stage"), [(1, 0), (2, 3)])
def test_a_full_fine_tuning_reference_adds_a_frozen_copy_of_the_weights(tiny_model_dir, processes, zero_stage):
    """DPO under full fine-tuning keeps a frozen copy of the start (train/objectives/reference.py): the plan's
    weights grow by the model's weights in its dtype (ZeRO-3: each rank's partitions); LoRA's reference is free."""
    from vidtune.train.training.memory_plan import ZERO3_PERSISTENCE_THRESHOLD, plan_memory
    from vidtune.train.training.model import apply_finetuning, build_on_meta

    def weights(*overrides: str) -> int:
        recipe = tiny_recipe(tiny_model_dir, *overrides)
        meta, family = build_on_meta(recipe.model)
        model = apply_finetuning(meta, family, recipe.finetune)
        return plan_memory(model, family, recipe, processes, zero_stage, deepspeed=zero_stage > 0).weights

    sizes = [p.numel() for p in build_on_meta(tiny_recipe(tiny_model_dir).model)[0].parameters()]
    copy = 4 * (  # float32, the tiny recipe's dtype
        sum(sizes)
        if zero_stage == 0
        else sum(-(-n // processes) + (n if n <= ZERO3_PERSISTENCE_THRESHOLD else 0) for n in sizes)
    )
    full = ("finetune.mode=full",)
    assert weights(*full, "train.objective=dpo") - weights(*full) == copy > 0
    assert weights("train.objective=dpo") == weights()  # LoRA: the adapter disabled, no copy


HEARING = [f for f in FAMILY_NAMES if f in ("qwen2_5_omni", "gemma4", "qwen3_omni_moe")]


def audio_saved_bytes(recipe, family, example) -> int:
    """One forward + backward of the tiny model as training builds it on a heard sample: the bytes of the distinct
    storages autograd saved for backward while the audio tower or its projection ran (weights excluded)."""
    from vidtune.data.collator import Collator
    from vidtune.train.training.model import apply_finetuning, enable_gradient_checkpointing, load_model

    model, fam = load_model(recipe.model)
    model = apply_finetuning(model, fam, recipe.finetune)
    if recipe.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    depth, saved = [0], {}
    prefixes = tuple(p.rstrip(".") for p in (fam.audio_tower_prefix, fam.audio_projector_prefix) if p)
    for name, module in core.named_modules():
        if name in prefixes:
            module.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1))
            module.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if depth[0] and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = Collator(family.processor.tokenizer.pad_token_id, family=fam)([example])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).logits.float().square().mean()
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize(
    "overrides",
    [
        ("finetune.mode=full", "finetune.audio_tower=full"),  # the subsampling convolutions keep theirs too
        ("finetune.audio_tower=lora",),
        ("finetune.audio_tower=lora", "model.gradient_checkpointing=true"),  # Qwen's layers keep only inputs
        # frozen, but under checkpointing transformers makes Qwen's first convolution's output require grad
        ("model.gradient_checkpointing=true",),
    ],
    ids=["full", "lora", "lora-checkpointing", "frozen-checkpointing"],
)
@pytest.mark.parametrize("family", HEARING)
def test_the_audio_row_is_within_35_percent_of_what_the_audio_tower_keeps(family, family_kits, overrides, tmp_path):
    """A heard clip of the tone twins (41 audio tokens) through the tiny model: the plan's audio row, for a longest
    sample of as many audio tokens, against the storages autograd keeps inside the audio tower and its projection.
    (35%: the front runs on features padded to whole windows, and CPU dropout keeps a float mask, not a byte.)"""
    from tests.hearing import heard_example, write_tone_twins
    from vidtune.train.training.memory_plan import plan_memory
    from vidtune.train.training.model import apply_finetuning, build_on_meta

    kit = family_kits(family)
    example = heard_example(kit, write_tone_twins(tmp_path)[300])
    audio_token = kit.processor.tokenizer.convert_tokens_to_ids(kit.processor.audio_token)
    num_audio = int((example["input_ids"] == audio_token).sum())
    recipe = tiny_recipe(kit.model_dir, *overrides, f"data.max_length={num_audio}")
    meta, fam = build_on_meta(recipe.model)
    plan = plan_memory(apply_finetuning(meta, fam, recipe.finetune), fam, recipe)
    torch.manual_seed(0)
    real = audio_saved_bytes(recipe, kit, example)
    assert plan.audio == pytest.approx(real, rel=0.35)
    frozen = not any(o.startswith("finetune.audio_tower=") for o in overrides)
    assert (real > 0) == (not frozen or fam.name != "gemma4")  # Gemma 4's tower has no input embeddings to hook
    assert "audio" in plan.table() and plan.total == (
        plan.weights + plan.gradients + plan.optimizer + plan.activations + plan.audio + plan.recompute
    )


def test_no_audio_row_without_a_tower_sound_or_training_of_it(family_kits, tmp_path):
    """A model that does not hear has no audio row; data.audio=off plans 0 (and the tower, given no sound, keeps
    nothing); a frozen tower keeps nothing for backward, and plans 0."""
    from tests.hearing import heard_example, write_tone_twins
    from vidtune.train.training.memory_plan import plan_memory
    from vidtune.train.training.model import apply_finetuning, build_on_meta

    def planned(model_dir, *overrides):
        recipe = tiny_recipe(model_dir, *overrides)
        meta, fam = build_on_meta(recipe.model)
        return plan_memory(apply_finetuning(meta, fam, recipe.finetune), fam, recipe), recipe

    silent, _ = planned(family_kits("llava_next_video").model_dir)
    assert (silent.audio, silent.hears) == (0, False) and "audio" not in silent.table()
    kit = family_kits(HEARING[0])
    full = ("finetune.mode=full", "finetune.audio_tower=full")
    off, recipe = planned(kit.model_dir, *full, "data.audio=off")
    assert off.hears and off.audio == 0 and "audio" in off.table()
    assert audio_saved_bytes(recipe, kit, heard_example(kit, write_tone_twins(tmp_path)[300], audio_rate=None)) == 0
    heard, _ = planned(kit.model_dir, *full)
    frozen, recipe = planned(kit.model_dir)
    assert heard.audio > 0 and frozen.audio == 0
    assert audio_saved_bytes(recipe, kit, heard_example(kit, write_tone_twins(tmp_path)[300])) == 0
