"""Compression beyond weight-only quantization: structured pruning to a smaller dense model
(prune.py, scored by importance.py), knowledge distillation (distill.py), quantization-aware
training (qat.py) and a search over all of them against a size / accuracy budget (optimize.py).
The command-line tools (`fastvlm prune | distill | optimize`) are in cli.py.

Every tool writes an ordinary model folder: nothing here adds a module type to inference.
"""
