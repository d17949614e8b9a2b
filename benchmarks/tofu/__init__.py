"""Reproduction of the SIFT-Masks paper's TOFU study on hf_sift: ``python -m benchmarks.tofu --profile cpu``.

See docs/tofu.md for the methods, the metrics and their sources, the profiles and the results schema.
"""
