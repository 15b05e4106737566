"""Evaluation: run a model (or a training run's checkpoint) on QA benchmarks and store per-example results.

``sr1.eval.runner.evaluate`` is the entry point; ``sr1.eval.methods`` defines direct/cot/rag/search;
``sr1.eval.metrics`` turns per-example rows into the per-dataset summary.
"""
