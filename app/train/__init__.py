"""Training and analysis of compressed DeiTs: distillation, its data, losses and schedule,
evaluation and the attention analysis. Never imported by the server."""
