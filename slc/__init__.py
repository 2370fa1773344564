"""The SLC library: data, models, losses, metrics, training, export, benchmark; the stages in `pipeline/` call it."""
