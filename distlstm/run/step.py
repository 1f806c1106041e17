"""The training step, in one place: one optimizer step over this rank's micro-batches.

Read top to bottom (`TrainStep`):
- `loss_scale`: the loss of every micro-batch is its summed loss times `world_size / global_items`,
  the item count of the whole step (all micro-batches on all ranks; DDP averages over ranks, the
  world size undoes that), so accumulation and world size do not change the gradient;
- `accumulate`: per micro-batch (per piece of it with data.too_long=chunk, through the
  `StateCarrier` that carries the LSTM state in lm stream mode), `backward`: forward under the
  precision's autocast, masked loss, backward, with DDP's `no_sync` on all but the last piece of the
  last micro-batch (gradients are all-reduced once, by the last backward);
- `optimize`: fp16 unscales, clips and lets the GradScaler step (a skipped overflow step does not
  advance the LR schedule); fp32/bf16 run `update`: clip, the non-finite check and the fused
  optimizer, which skips the update on the device when the gradient is not finite;
- `zero_grads`: freed, or zeroed in place while CUDA graphs hold their addresses.

`backward` and `update` are the device body of the step: what an eager step runs and what
distlstm/run/graphs.py captures into a CUDA graph (with the batch, the loss scale and the weight in
static tensors). They touch only device tensors and update every value that outlives the step in
place (`loss_sum`, `grad_norm`, `bad_run`, `skipped`: read by the trainer at its log cadence), and
read nothing back to the host.

The host side of a step (the item count's all-reduce, the host counters, the LR schedule, whether a
step is replayed) belongs to the caller, `Trainer.train_step`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from distlstm.data.batch import Batch
from distlstm.distributed.parallel import AmpPolicy, no_sync, unwrap
from distlstm.run.bptt import Piece, StateCarrier
from distlstm.tasks import Task


class TrainStep:
    """The step of one model (DDP-wrapped or not) and its optimizer; see the module docstring."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, amp: AmpPolicy, world_size: int,
                 grad_clip: float, carry: StateCarrier, device: torch.device):
        self.model, self.optimizer, self.amp, self.carry, self.device = model, optimizer, amp, carry, device
        self.world_size = world_size
        self.clip = grad_clip or float("inf")
        self.task: Task = unwrap(model).spec
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        """Summed loss of the real items since the trainer last read it (weight-0 filler batches left out)."""
        self.grad_norm = torch.zeros((), device=device)
        """The last step's gradient norm, before clipping."""
        self.bad_run = torch.zeros((), device=device)
        """Consecutive non-finite steps."""
        self.skipped = torch.zeros((), device=device)
        """Steps the fused optimizer skipped (non-finite, fp32/bf16) since the trainer last read it."""

    # ------------------------------------------------------------------ host values
    def items(self, micro_batches: Sequence[Batch]) -> float:
        """This rank's real items in the step (tokens with a target for tag/lm, samples otherwise)."""
        return float(sum(self.task.item_count(b) for b in micro_batches))

    def loss_scale(self, global_items: float) -> float:
        """What every summed micro-batch loss is multiplied by (times its weight)."""
        return self.world_size / max(global_items, 1.0)

    # ------------------------------------------------------------------ the device body
    def backward(self, piece: Piece, scale: float | Tensor, weight: float | Tensor, *, sync: bool,
                 autocast) -> None:
        """Forward, masked loss times `scale`, backward (DDP all-reduces only when `sync`), and the
        loss summed into `loss_sum` times `weight` (1, or 0 for a filler batch). `scale` and `weight`
        are host numbers eagerly and static device tensors inside a graph; `autocast` the
        precision's context (graphs pass one without autocast's weight cache)."""
        with no_sync(self.model, skip=not sync):
            with autocast:
                outputs = self.carry.forward(self.model, piece)
            loss_sum, _, _ = self.task.loss_and_metrics(outputs, piece.targets, piece.lengths)
            loss = loss_sum * scale
            (self.amp.scaler.scale(loss) if self.amp.scaler else loss).backward()
        self.loss_sum += loss_sum.detach().double() * weight

    def update(self) -> None:
        """Clip, then the fused optimizer (optim.name), which skips the update on the device when the
        gradient is not finite. Device work only, every counter updated in place: a CUDA graph
        captures it as is."""
        self.clip_grads()
        bad = (~torch.isfinite(self.grad_norm)).float()
        # The fused optimizer skips the update where found_inf is set, without the host knowing.
        self.optimizer.found_inf, self.optimizer.grad_scale = bad, None
        self.optimizer.step()
        del self.optimizer.found_inf, self.optimizer.grad_scale
        self.bad_run.add_(bad).mul_(bad)
        self.skipped.add_(bad)

    def clip_grads(self) -> None:
        """Clip to optim.grad_clip; the norm before clipping into `grad_norm` (in place)."""
        self.grad_norm.copy_(torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True))

    def zero_grads_in_place(self) -> None:
        """The end of a captured step: gradients zeroed where they are, for the next step."""
        torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])

    # ------------------------------------------------------------------ the eager step
    def accumulate(self, micro_batches: Sequence[Batch], global_items: float) -> None:
        """Accumulate the step's gradient: d(sum of losses / global item count)/d(params)."""
        scale = self.loss_scale(global_items)
        last = len(micro_batches) - 1
        for i, host_batch in enumerate(micro_batches):
            batch = host_batch.to(self.device, non_blocking=True)
            # One piece per batch, except with data.too_long=chunk (distlstm/run/bptt.py); the state a
            # piece leaves is carried into the next piece, and in lm stream mode into the next step.
            for piece in self.carry.pieces(batch, host_batch):
                self.backward(piece, scale * batch.weight, batch.weight, sync=i == last and piece.last,
                              autocast=self.amp.autocast())

    def optimize(self) -> bool:
        """The optimizer step after `accumulate`; False when fp16's GradScaler skipped it (an
        overflow): such a step must not advance the LR schedule. Skips of the fused optimizer
        (fp32/bf16) are counted on the device (`skipped`) and taken off the schedule later."""
        if self.amp.scaler is None:
            self.update()
            return True
        scaler = self.amp.scaler
        scaler.unscale_(self.optimizer)
        self.clip_grads()
        before = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        # This comparison is fp16's one host sync per step; bf16 and fp32 need none.
        if scaler.get_scale() < before:
            # Overflow skips are routine while the scale settles; overflowing with a scale below 1
            # means the values are not finite even unscaled: count toward train.max_bad_steps.
            if scaler.get_scale() < 1.0:
                self.bad_run.add_(1)
            return False
        self.bad_run.zero_()
        return True

    def zero_grads(self, *, keep: bool) -> None:
        """After an eager step: free the gradients, or zero them (`keep`: CUDA graphs hold their addresses)."""
        self.optimizer.zero_grad(set_to_none=not keep)
