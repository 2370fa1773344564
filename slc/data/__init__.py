"""Data: the dataset registry, preparing a dataset once, and reading the prepared splits while training and scoring."""
