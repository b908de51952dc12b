"""The HTTP face and shared state of saliency-audit. Never imports torch."""
