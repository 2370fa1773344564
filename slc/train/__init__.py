"""Training: one run in plain PyTorch, and the loss grid on Ray Tune / Ray Train with its MLflow record."""
