"""LLM sparsification harness: prune, analyze, export, benchmark, evaluate and report."""
