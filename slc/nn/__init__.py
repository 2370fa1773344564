"""The network and what it is trained with: models (backbone + head), pretrained weights, the losses, sampled candidates."""
