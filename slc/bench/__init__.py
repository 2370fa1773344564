"""Benchmarks: the paper's Table 2 in onnxruntime, its timing tools, typed results and report."""
