"""Adversarial and robustness methods: defensive distillation, attack tracing, robust weight signatures."""
