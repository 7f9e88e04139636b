"""Answers from a trained model, sampling frames as in training (the run's vidtune.json).

infer.py    load a trained folder (adapter or full model) or a base checkpoint; batched greedy generation
chat.py     `vidtune chat`: a multi-turn conversation about a video in the terminal
predict.py  `vidtune predict`: answer every row of a corpus into JSONL
"""
