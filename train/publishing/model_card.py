"""The README.md model card of an exported run: Hub front matter, usage, frame sampling, hyperparameters, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

FRAMES_NOTE = (
    "Sample frames the way training did (below): the model learned to read that many video tokens per clip, "
    "and other frame counts silently give worse answers."
)


def is_hub_id(name: str) -> bool:
    """`org/name` (or a bare name), not a local path: what a Hub link or `base_model` may name."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not Path(name).exists()


def dataset_name(path: str) -> str:
    """A source as the card shows it: a Hub dataset by its id, a local file by its file name (never its path)."""
    return path if is_hub_id(path) and not Path(path).suffix else Path(path).name


def recorded_hub_id(base: str) -> str | None:
    """The Hub model a local base folder is a copy of, where the folder says so: the Hub cache's folder name
    (`models--org--name/snapshots/...`), else the `_name_or_path` its config.json records (configs saved by
    transformers 4, as many Hub repos hold, carry it)."""
    for part in Path(base).parts:
        if part.startswith("models--") and "--" in part.removeprefix("models--"):
            return part.removeprefix("models--").replace("--", "/", 1)
    try:
        recorded = json.loads((Path(base) / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and "/" in recorded and is_hub_id(recorded) else None


def local_base_note(base: str) -> str | None:
    """What the publisher is told when the base is a local folder (None: it is a Hub id)."""
    if is_hub_id(base):
        return None
    recorded = recorded_hub_id(base)
    if recorded:
        return (
            f"note: the base model {base} is a local folder; its config records {recorded}. If it is a copy of that "
            f"model, export with --base-id {recorded}: the card then links it and its code (and `vidtune infer`) "
            "load it from the Hub"
        )
    return (
        f"note: the base model {base} is a local folder that names no Hub model; the card cannot link it. Export "
        "with --base-id ORG/NAME (the Hub model it is a copy of) so the card and its code name it"
    )


def front_matter(metadata: dict[str, Any], card: dict[str, Any], merged: bool) -> str:
    fields: dict[str, Any] = {}
    if is_hub_id(metadata["base_model"]):  # a local base folder is not published
        fields["base_model"] = metadata["base_model"]
        fields["base_model_relation"] = "finetune" if merged else "adapter"
    fields.update(
        {
            "library_name": "transformers" if merged else "peft",
            "pipeline_tag": "video-text-to-text",
            "license": card.get("license") or "other",
            "tags": [
                "vidtune",
                family_of(metadata).name.replace("_", "-"),
                "video",
                metadata.get("variant", "instruct"),
            ]
            + ([] if merged else ["lora"]),
        }
    )
    if card.get("datasets"):
        fields["datasets"] = list(card["datasets"])
    return "---\n" + yaml.safe_dump(fields, sort_keys=False) + "---\n"


def family_of(metadata: dict[str, Any]) -> Any:
    """The model family the run trained (vidtune.json's model_type; runs from before it was recorded were
    LLaVA-NeXT-Video)."""
    from vidtune.data.families import family_for

    return family_for(metadata.get("model_type", "llava_next_video"))


def reads_video_metadata(family: Any) -> bool:
    """Whether the family's processor takes its time information from `video_metadata` (Qwen: without it, it
    assumes 24 fps and the model sees the wrong times)."""
    return bool(family.video_processor_kwargs([((0.0, 0.5), 1.0)]))


# How the frames reach the processor: the card's code must hand the model the very pixels vidtune does (training,
# `vidtune infer`), or its answers drift from vidtune's (seen: greedy answers that differed after a few tokens).
# Frames are picked on presentation time as in training (the frame on screen at the centre of each of N equal time
# segments; the last frame lasts as long as the one before it), and only those frames are decoded (a seek to the
# keyframe before each). They are turned upright as players do, and for families whose decoder scales frames
# (LLaVA: `frame_px`) brought to that shorter side with torchvision's antialiased resize, as vidtune's decoder does.
# Time-aware families (Qwen) are also given each frame's presentation time as `video_metadata`, written the way
# vidtune hands it over: times in milliseconds as frame indices of a 1000 fps stream, and the sampled frames' mean
# spacing (Qwen2.5-VL derives its temporal position step from it, Qwen3-VL writes `<t seconds>` from the times).
READ_FRAMES = """def read_frames(path, num_frames={frames}):
    # Only the sampled frames are decoded: every frame's time comes from the packets, then each one is sought.
    with av.open(path) as container:
        stream = container.streams.video[0]
        pts = sorted(packet.pts for packet in container.demux(stream) if packet.pts is not None)
        times = [float((p - pts[0]) * stream.time_base) for p in pts]  # seconds, first frame = 0
        end = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1 / float(stream.average_rate))
        # the frame on screen at the centre of {frames} equal time segments, as in training
        centres = (np.arange(num_frames) + 0.5) * end / num_frames
        picked = [max(0, int(np.searchsorted(times, c + 1e-6, side="right")) - 1) for c in centres]
        frames = {{}}
        for index in sorted(set(picked)):
            container.seek(pts[index], stream=stream)  # the keyframe at or before it
            frame = next(f for f in container.decode(stream) if f.pts is not None and f.pts >= pts[index])
            # upright, as players show it (FFmpeg's rotation is counter-clockwise)
            frames[index] = np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation) // 90)
    return np.stack([frames[i] for i in picked]), [times[i] for i in picked]
"""

SCALE_FRAMES = """
def to_model_size(frames, shortest_edge={edge}):
    # the shorter side down to the model's input size with an antialiased resize, as training decoded them
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    height, width = video.shape[-2:]
    scale = shortest_edge / min(height, width)
    if scale < 1:
        size = [max(shortest_edge, round(height * scale)), max(shortest_edge, round(width * scale))]
        video = resize(video, size, antialias=True)
    return video.permute(0, 2, 3, 1).numpy()
"""

FRAMES_ONLY = """
frames, _ = read_frames("clip.mp4")
conversation = [{{"role": "user", "content": [{{"type": "video"}}, {{"type": "text", "text": "What happens?"}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(text=prompt, videos=[{frames}], do_sample_frames=False{special}, return_tensors="pt")"""

FRAMES_AND_TIMES = """
def video_metadata(times):
    # The model reads time from this (without it the processor assumes 24 fps): each frame's time in ms, as a frame
    # index of a 1000 fps stream, and the frames' mean spacing, from their real presentation times.
    spacing = max((times[-1] - times[0]) / (len(times) - 1), 0.001) if len(times) > 1 else 0.001
    return {{"fps": 1000.0, "frames_indices": [round(t * 1000) for t in times],
            "total_num_frames": max(1, round(len(times) * spacing * 1000))}}

frames, times = read_frames("clip.mp4")
conversation = [{{"role": "user", "content": [{{"type": "video"}}, {{"type": "text", "text": "What happens?"}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(text=prompt, videos=[{frames}], video_metadata=[video_metadata(times)], do_sample_frames=False,
                   {rate}{special}return_tensors="pt")"""

# Omni processors space a video's temporal positions (and its sound's) by the `fps` they are given, not by the
# metadata (Qwen3-Omni-MoE: 1 fps without it): the sampled frames' own rate, as vidtune passes it.
FRAME_RATE = """
def frame_rate(times):
    # the sampled frames' rate (1 / their mean spacing)
    return 1 / max((times[-1] - times[0]) / (len(times) - 1), 0.001) if len(times) > 1 else 1.0
"""


def frame_code(metadata: dict[str, Any], family: Any) -> tuple[str, list[str]]:
    """The card's frame reading and processor call, and the imports it needs beyond numpy and av."""
    edge = metadata.get("frame_px")
    frames = "to_model_size(frames)" if edge else "frames"
    code = READ_FRAMES.format(frames=metadata["sampling"]["num_frames"])
    code += SCALE_FRAMES.format(edge=edge) if edge else ""
    # a template that writes the BOS itself (Gemma's): the processor must not add a second one
    writes_bos = "bos_token" in family.chat_template
    timed = reads_video_metadata(family)
    special = ("add_special_tokens=False, " if timed else ", add_special_tokens=False") if writes_bos else ""
    rated = "fps" in family.video_processor_kwargs([((0.0, 0.5), 1.0)])
    code += FRAME_RATE if rated else ""
    rate = "fps=frame_rate(times), " if rated else ""
    code += (FRAMES_AND_TIMES if timed else FRAMES_ONLY).format(frames=frames, special=special, rate=rate)
    imports = ["import torch", "from torchvision.transforms.v2.functional import resize"] if edge else []
    return code, imports


def bnb_code(settings: dict[str, Any] | None, skip_modules: tuple[str, ...]) -> str | None:
    """The BitsAndBytesConfig a QLoRA adapter's base loads with, as Python source (None: not quantized)."""
    if not settings:
        return None
    skip = f"llm_int8_skip_modules={list(skip_modules)!r}"
    if settings["bits"] == 8:
        return f"quantization = BitsAndBytesConfig(load_in_8bit=True, {skip})"
    compute = settings["compute_dtype"]
    # auto: the run's model.dtype, which auto resolved to bf16 on GPUs that have it, else fp32
    auto = "torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32"
    compute_code = auto if compute == "auto" else f"torch.{compute}"
    return (
        "quantization = BitsAndBytesConfig(\n    load_in_4bit=True,\n"
        f'    bnb_4bit_quant_type="{settings["quant_type"]}",\n'
        f"    bnb_4bit_use_double_quant={settings['double_quant']},\n    bnb_4bit_compute_dtype={compute_code},\n"
        f"    {skip},\n)"
    )


def usage(metadata: dict[str, Any], repo: str, merged: bool) -> str:
    family = family_of(metadata)
    base = (
        metadata["base_model"] if is_hub_id(metadata["base_model"]) else f"PATH/TO/{Path(metadata['base_model']).name}"
    )
    recorded = None if is_hub_id(metadata["base_model"]) else recorded_hub_id(metadata["base_model"])
    where = f"  # a local folder; its config records {recorded}" if recorded else "  # a local model folder"
    where = "" if is_hub_id(metadata["base_model"]) else where
    model_class = family.model_class
    quantized = None if merged else bnb_code(metadata.get("quantization"), family.quantization_skip_modules)
    base_kwargs = ', quantization_config=quantization, device_map={"": "cuda" if torch.cuda.is_available() else "cpu"}'
    load = (
        f'model = {model_class}.from_pretrained("{repo}")'
        if merged
        else f'base = {model_class}.from_pretrained("{base}"{base_kwargs if quantized else ""}){where}\n'
        f'model = PeftModel.from_pretrained(base, "{repo}")'
    )
    prepare, frame_imports = frame_code(metadata, family)
    imports = ["import numpy as np", "import av", *frame_imports]
    if quantized:  # QLoRA: the adapter was trained on the base quantized so; load it the same way (bitsandbytes)
        imports += [
            *(["import torch"] if "import torch" not in imports else []),
            "from transformers import BitsAndBytesConfig",
        ]
        load = f"{quantized}\n{load}"
    imports.append(f"from transformers import AutoProcessor, {model_class}")
    imports += [] if merged else ["from peft import PeftModel"]
    import_lines = "\n".join(imports)
    return f"""## Usage

With transformers{"" if merged else " + peft"}:

```python
{import_lines}

{load}
processor = AutoProcessor.from_pretrained("{repo}")  # carries the chat template used in training

{prepare}
output = model.generate(**inputs, max_new_tokens=128, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With vidtune (reads `vidtune.json` and samples frames as in training):

```bash
vidtune infer {repo} --video clip.mp4 --prompt "What happens?"
vidtune chat {repo} --video clip.mp4
```
"""


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items() if value not in (None, "", [])]
    return "\n".join(lines)


def epochs_trained(metadata: dict[str, Any]) -> float | None:
    """Passes over the training samples, from the steps actually taken (a max_steps run can take many epochs)."""
    hyper, samples = metadata.get("hyperparameters", {}), metadata.get("num_train_samples")
    try:
        per_device, accumulation = (int(x) for x in hyper["batch per device x accumulation"].split(" x "))
        seen = metadata["steps"] * per_device * accumulation * int(hyper.get("processes", 1))
    except (KeyError, ValueError, TypeError):
        return None
    return seen / samples if samples else None


def eval_metrics(metadata: dict[str, Any]) -> dict[str, float]:
    """The held-out metrics only: throughput, the learning rate and step counters say nothing about the model."""
    metrics = metadata.get("metrics") or {}
    return {k: v for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, int | float)}


FRACTION_METRICS = ("exact_match", "accuracy", "f1")
ONLY_LOSS_NOTE = (
    "Only the held-out loss was measured. Answers were not scored: set `eval.every_steps` (with "
    "`data.eval_sources`) to score them during training, or run `vidtune eval`."
)


def evaluation_section(metrics: dict[str, float]) -> str:
    """The held-out scores the run measured, task scores first (exact match, accuracy as percentages, with how many
    samples), then the loss; a note when the loss is all there is."""
    rows: dict[str, str] = {}
    for key, value in metrics.items():
        *group, name = key.removeprefix("eval/").split("/")
        if name == "num_samples" or key == "eval/loss":
            continue
        task = group[0] if group else ""
        samples = metrics.get(f"eval/{task}/num_samples")
        label = (f"{task}: " if task and task != "demo" else "") + name.replace("_", " ")
        label += f" ({samples:.0f} samples)" if samples else ""
        fraction = name in FRACTION_METRICS or task == "demo"  # the demo's scores are all shares of clips
        rows[label] = f"{100 * value:.1f}%" if fraction and 0 <= value <= 1 else f"{value:.4g}"
    if "eval/loss" in metrics:
        rows["loss"] = f"{metrics['eval/loss']:.4g}"
    note = "" if len(rows) > 1 or "eval/loss" not in metrics else "\n\n" + ONLY_LOSS_NOTE
    return "## Evaluation (held-out)\n\n" + _table(rows) + note + "\n"


def model_card(metadata: dict[str, Any], card: dict[str, Any], merged: bool = False, name: str = "") -> str:
    """`card`: the recipe's `hub` section (+ repo_id when pushing); `name`: the run's folder name, the title when
    there is no repo."""
    if card.get("base_id"):  # the publisher named the Hub model a local base folder is a copy of (--base-id)
        metadata = {**metadata, "base_model": card["base_id"]}
    title = (card.get("repo_id") or name or "vidtune-model").split("/")[-1]
    repo = card.get("repo_id") or f"./{name or 'this-folder'}"
    sampling = metadata["sampling"]
    kind = "model (adapter merged into the base)" if merged else "LoRA adapter"
    variant = metadata.get("variant", "instruct")
    base = metadata["base_model"]
    recorded = None if is_hub_id(base) else recorded_hub_id(base)
    base_text = (
        f"[{base}](https://huggingface.co/{base})"
        if is_hub_id(base)
        else f"`{Path(base).name}`, a local model folder whose config records `{recorded}`"
        if recorded
        else f"`{Path(base).name}`, a local model folder (not named on the Hub)"
    )
    sources = ", ".join(
        f"`{dataset_name(d['path'])}` ({d.get('num_samples', '?')} samples)" for d in metadata.get("datasets", [])
    )
    hyper = {k: v for k, v in metadata.get("hyperparameters", {}).items() if k != "epochs / max steps"}
    epochs = epochs_trained(metadata)
    metrics = eval_metrics(metadata)
    sections = [
        front_matter(metadata, card, merged),
        f"# {title}\n",
        f"{'An' if variant[:1] in 'aeiou' else 'A'} {variant} {kind} for {base_text}, fine-tuned with vidtune on "
        f"{sources or 'private data'}.\n",
        usage(metadata, repo, merged),
        "## Frame sampling\n\n"
        + FRAMES_NOTE
        + "\n\n"
        + _table(
            {
                "frames per clip": sampling.get("num_frames"),
                "fps (capped at the frame count)": sampling.get("fps"),
                "strategy": sampling.get("strategy"),
                "frame resolution (px)": metadata.get("frame_px"),
                "time instruction in the prompt": metadata.get("time_instruction"),
                "max length (tokens, video tokens included)": metadata.get("max_length"),
            }
        )
        + "\n",
        "## Training\n\n"
        + _table(
            {
                "fine-tuning": metadata.get("finetune_mode"),
                "training samples": metadata.get("num_train_samples"),
                "optimizer steps": metadata.get("steps"),
                "epochs": f"{epochs:.3g}" if epochs is not None else None,
                **hyper,
            }
        )
        + "\n",
    ]
    if metrics:
        sections.append(evaluation_section(metrics))
    return "\n".join(sections)
