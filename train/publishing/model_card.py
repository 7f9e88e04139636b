"""The README.md model card of an exported run: Hub front matter, usage, frame sampling, hyperparameters, metrics."""

from __future__ import annotations

from typing import Any

import yaml

FRAMES_NOTE = (
    "Sample frames the way training did (below): the model learned to read that many video tokens per clip, "
    "and other frame counts silently give worse answers."
)


def front_matter(metadata: dict[str, Any], card: dict[str, Any], merged: bool) -> str:
    fields: dict[str, Any] = {
        "base_model": metadata["base_model"],
        "library_name": "transformers" if merged else "peft",
        "pipeline_tag": "video-text-to-text",
        "license": card.get("license") or "other",
        "tags": ["vidtune", "llava-next-video", "video", metadata.get("variant", "instruct")]
        + ([] if merged else ["lora"]),
    }
    if card.get("datasets"):
        fields["datasets"] = list(card["datasets"])
    return "---\n" + yaml.safe_dump(fields, sort_keys=False) + "---\n"


def usage(metadata: dict[str, Any], repo: str, merged: bool) -> str:
    frames = metadata["sampling"]["num_frames"]
    load = (
        f'model = LlavaNextVideoForConditionalGeneration.from_pretrained("{repo}")'
        if merged
        else f'base = LlavaNextVideoForConditionalGeneration.from_pretrained("{metadata["base_model"]}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo}")'
    )
    imports = "from transformers import AutoProcessor, LlavaNextVideoForConditionalGeneration"
    imports += "" if merged else "\nfrom peft import PeftModel"
    return f"""## Usage

With transformers{"" if merged else " + peft"}:

```python
import numpy as np
import av
{imports}

{load}
processor = AutoProcessor.from_pretrained("{repo}")  # carries the chat template used in training

def read_frames(path, num_frames={frames}):
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    edges = np.linspace(0, len(frames), num_frames + 1)  # centre of {frames} equal segments, as in training
    return np.stack([frames[int((a + b) / 2)] for a, b in zip(edges[:-1], edges[1:])])

conversation = [{{"role": "user", "content": [{{"type": "video"}}, {{"type": "text", "text": "What happens?"}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(text=prompt, videos=[read_frames("clip.mp4")], return_tensors="pt")
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


def model_card(metadata: dict[str, Any], card: dict[str, Any], merged: bool = False) -> str:
    repo = card.get("repo_id") or "PATH_OR_REPO_ID"
    sampling = metadata["sampling"]
    kind = "model (adapter merged into the base)" if merged else "LoRA adapter"
    hyper = metadata.get("hyperparameters", {})
    sources = ", ".join(f"`{d['path']}` ({d.get('num_samples', '?')} samples)" for d in metadata.get("datasets", []))
    metrics = metadata.get("metrics") or {}
    sections = [
        front_matter(metadata, card, merged),
        f"# {repo.split('/')[-1]}\n",
        f"A {metadata.get('variant', 'instruct')} {kind} for [{metadata['base_model']}]"
        f"(https://huggingface.co/{metadata['base_model']}), fine-tuned with vidtune on {sources or 'private data'}.\n",
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
                **hyper,
            }
        )
        + "\n",
    ]
    if metrics:
        sections.append("## Metrics\n\n" + _table({k: f"{v:.4g}" for k, v in metrics.items()}) + "\n")
    return "\n".join(sections)
