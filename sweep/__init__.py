"""kdsweep: hyperparameter sweeps for knowledge distillation under adversarial attack."""

__version__ = "0.1.0"
