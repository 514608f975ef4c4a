"""Training utilities: the procedural shapes dataset, tokenizer building and training loops."""
