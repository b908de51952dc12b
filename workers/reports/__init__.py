"""Rendering of what an audit produced: heatmap PNGs (and, later, the JSON and PDF reports).
Torch-free: numpy and Pillow only, so the API process could render too."""
