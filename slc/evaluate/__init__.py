"""Evaluation: the paper's single-logit metrics, scored at any k in class chunks, Table 1 and its plots."""
