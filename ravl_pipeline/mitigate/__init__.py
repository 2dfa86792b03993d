"""Stage 2: the training methods (one registry), their losses, the spurious-region
assignment, the fine-tuning loop and its data-parallel form."""
