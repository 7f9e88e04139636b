"""vidtune.data: corpora in, model-ready batches out. Pure CPU code: no model loop, no Accelerate.

sources.py       corpus files and Hub datasets -> rows (columns, media roots, mixing weights, streaming)
caption_files.py caption corpora shipped as one JSON object (MSR-VTT, ActivityNet Captions) -> caption rows
formats.py       row formats (llava, openai, caption, qa, multiple_choice) -> conversations
conversation.py  the Conversation shape every stage shares (messages with roles, video, image and sound parts in place)
video/           decoding behind one interface (TorchCodec, decord, PyAV), sampling by presentation time
audio.py         a clip's sound for its sampled span, and sound files whole or by span (TorchCodec, PyAV), for the
                 families that hear (data.audio)
frame_cache.py   decoded frames kept across epochs and runs
quality.py       the bad-sample budget, decode time limits
examples.py      conversation + frames -> input_ids, labels, pixels (the family's template and processor)
preference.py    preference pairs (DPO): one decode, chosen and rejected examples, one batch of both
rollouts.py      reward-training prompts (GRPO): one decode per prompt, shared by its group of completions
dataset.py       measuring, length drops, map-style and streamed datasets, the epoch batch sampler
measure_cache.py the start-up measurements cached on disk by row, media file identity and settings
collator.py      pad examples into a batch (visual tensors batched by the family)
packing.py       pack a micro-batch's samples: one padding-free row or first-fit rows, positions per sample
families/        one module per model family: everything model-specific
"""
