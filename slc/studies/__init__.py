"""Studies beside the pipeline: scaling in k, data loading, and what the presets would cost on GPUs."""
