"""The optimizers (`optim.name`: adamw, adam, sgd) and the plateau schedule (`optim.schedule=plateau`).

Every optimizer is torch's *fused* implementation: it takes the trainer's non-finite flag as a tensor
(`optimizer.found_inf`) and skips the update on the device, so skipping a bad step needs no host sync
(see `TrainStep.update` in distlstm/run/step.py); the GradScaler drives the same flag under fp16.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def make_optimizer(groups: list[dict], optim_cfg) -> torch.optim.Optimizer:
    """The fused optimizer `optim_cfg.name` over `groups` (param groups with their weight decay)."""
    if optim_cfg.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                                    nesterov=optim_cfg.nesterov, fused=True)
        if optim_cfg.momentum:
            _zero_momentum_buffers(optimizer)
        return optimizer
    cls = torch.optim.AdamW if optim_cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps, fused=True)


def _zero_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    # Fused SGD allocates its momentum buffers with torch.empty_like on its first step and lets that
    # step's kernel fill them. When the first step is skipped (a non-finite gradient, or an fp16
    # overflow while the GradScaler settles, which is routine), the kernel writes nothing and every
    # later step reads uninitialised memory. Zero buffers from the start give bit-identical updates
    # to torch's own first step (0 x momentum + grad = grad, no dampening) and are safe to skip.
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class PlateauSchedule(LambdaLR):
    """`optim.schedule=plateau`: the warmup of `lr_lambda`, then a constant lr multiplied by `factor`
    each time the validation loss has not reached a new best for `patience` evaluations in a row.

    The trainer calls `observe(loss)` after each cadence evaluation. The plateau state (scale, best
    loss, evaluations without improvement) is part of `state_dict()`, which LambdaLR builds from the
    instance's attributes, so a resumed run reduces the lr at the same evaluations as an
    uninterrupted one; `factor` and `patience` come from the config of the run being resumed.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float], *, factor: float,
                 patience: int) -> None:
        self.factor, self.patience = factor, patience
        self.scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0
        super().__init__(optimizer, lambda step: lr_lambda(step) * self.scale)

    def observe(self, loss: float) -> bool:
        """Record one evaluation's loss; True if the lr was reduced (effective from the next step)."""
        if math.isfinite(loss) and (self.best is None or loss < self.best):
            self.best, self.bad_evals = loss, 0
            return False
        self.bad_evals += 1
        if self.bad_evals < self.patience:
            return False
        self.bad_evals = 0
        self.scale *= self.factor
        # Apply at once: waiting for the next scheduler.step() would run one more step at the old lr.
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # a tensor lr (capturable optimizers) is updated in place
            else:
                group["lr"] = lr
        self._last_lr = lrs
        return True

    def state_dict(self) -> dict:
        state = super().state_dict()
        del state["factor"], state["patience"]  # from the config, so that a resumed run may change them
        return state
