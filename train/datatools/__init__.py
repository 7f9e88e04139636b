"""A recipe's data, before any GPU time.

check.py  `vidtune check`: every unreadable file and malformed row, token lengths, drops, label counts
cache.py  `vidtune cache`: decode a recipe's clips into its frame cache ahead of training
show.py   `vidtune show`: an HTML page of what training feeds the model (frames, prompt, label span)
frames.py `vidtune frames`: the frames sampling picks from one video (backend, times, PNGs, contact sheet)
inputs.py what a command reads, checked before any model loads (model paths, data files, media roots, videos)
"""
