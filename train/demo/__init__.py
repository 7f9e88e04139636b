"""`vidtune demo` and the fixtures tests share with it.

stages.py      the demo: corpus -> tiny model -> base -> instruct -> chat, scored after each stage
corpus.py      the demo corpus: captions, order questions and two-turn chats about generated clips
clips.py       MP4 clips of coloured segments, encoded with PyAV (and with a tone per segment, AAC)
tiny_model.py  tiny random models built from configs (TINY_MODELS: one builder per family), LLaVA-NeXT-Video's here
tiny_llava_onevision.py  a tiny random LLaVA-OneVision with its real processor classes
tiny_qwen2_5_vl.py  a tiny random Qwen2.5-VL (real processor classes, Qwen2 tokenizer, hub-shaped template)
tiny_qwen3_vl.py    a tiny random Qwen3-VL, the same way
tiny_qwen3_5.py     a tiny random Qwen3.5 (Qwen3-VL processor classes, hybrid Gated DeltaNet + attention text model)
tiny_qwen2_5_omni.py  a tiny random Qwen2.5-Omni thinker (Omni processor, Whisper feature extractor, Omni specials)
tiny_qwen3_omni_moe.py  a tiny random Qwen3-Omni-MoE thinker (4 experts, 2 active; Omni processor and specials)
tiny_internvl.py    a tiny random InternVL3.5 (InternVL processor classes, Qwen3 text model, the hub's template)
tiny_gemma4.py      a tiny random Gemma 4 (Gemma4Processor with its video processor and audio feature extractor)
"""
