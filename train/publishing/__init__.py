"""A finished run made shareable: `vidtune export`.

export.py      Hub-ready folder (allowlisted files, optional merge of the adapter), token check, push
model_card.py  the README.md model card from the run's vidtune.json
"""
