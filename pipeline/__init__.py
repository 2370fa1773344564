"""The DVC stages, one thin entry point each: `python -m pipeline.<stage>` (see dvc.yaml)."""
