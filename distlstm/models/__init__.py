"""Models: the LSTM encoder with task heads and the masked, summed loss (see lstm.py)."""

from distlstm.models.lstm import (
    TASKS,
    SequenceModel,
    build_model,
    flops_per_token,
    loss_and_metrics,
    num_parameters,
)

__all__ = [
    "TASKS",
    "SequenceModel",
    "build_model",
    "flops_per_token",
    "loss_and_metrics",
    "num_parameters",
]
