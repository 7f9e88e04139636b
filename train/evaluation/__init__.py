"""Scored answers: `vidtune eval` and the generation-based eval that runs during training.

tasks.py    evaluation items from corpora, generation or log-likelihood scoring, per-task metrics, outputs
metrics.py  exact match, token F1, option parsing, COCO caption scores, classification, confusion matrices
"""
