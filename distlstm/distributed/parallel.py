"""Everything about running one model on many devices: DDP wrapping and the mixed-precision policy.
Model code stays free of torch.distributed; the trainer asks this module for the wrapped model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distlstm.distributed.world import World

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_ddp(model: nn.Module, world: World, device: torch.device, *, bucket_mb: float = 25.0,
              grad_as_bucket_view: bool = True, static_graph: bool = False, force: bool = False) -> nn.Module:
    """Wrap in DDP when there is more than one rank, or with `force` (train.ddp=on) in a process group
    of one (`session` made it). DDP broadcasts rank 0's parameters at construction, so every rank
    starts from the same weights whatever its seed.

    - `bucket_mb`: gradients are all-reduced in buckets of about this size, in reverse parameter
      order, each as soon as its gradients are ready. An LSTM's recurrent weights all get their
      gradients at the end of its backward (cuDNN computes them in one call), so only the head's
      (and, for lm, the output layer's) all-reduce overlaps the backward; larger buckets mean fewer
      collectives for the rest.
    - `grad_as_bucket_view`: `.grad` tensors are views into the buckets: no copy of every gradient
      into and out of the buckets per step, and no second copy of the gradients in memory.
    - `static_graph`: the same parameters get gradients in every step (true of every model here),
      so DDP can skip the per-step bookkeeping; DDP does not support it together with `no_sync`
      (gradient accumulation), which the caller must not combine with it.
    """
    if not world.is_distributed and not force:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_mb,
                                   gradient_as_bucket_view=grad_as_bucket_view, static_graph=static_graph,
)


def ddp_options(train_cfg) -> dict:
    """apply_ddp's keyword arguments from the [train] config section."""
    static = train_cfg.ddp_static_graph == "on" or (train_cfg.ddp_static_graph == "auto" and train_cfg.accum_steps == 1)
    return {"bucket_mb": train_cfg.ddp_bucket_mb, "grad_as_bucket_view": train_cfg.ddp_grad_as_bucket_view,
            "static_graph": static, "force": train_cfg.ddp == "on"}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool):
    """DDP's no_sync on all but the last micro-batch: gradients accumulate locally and are
    all-reduced once, by the last backward, instead of once per micro-batch."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


@dataclass
class AmpPolicy:
    """Autocast dtype for forward passes, and a GradScaler for fp16 (bf16 needs none).

    The parameters, their gradients and the optimizer state stay fp32 in every precision. Under bf16
    the LSTM itself runs outside autocast, on bf16 copies of its weights (`SequenceModel.run_lstm`:
    autocast's cuDNN RNN path would run it in fp16, unscaled); `describe` says what runs in what."""

    precision: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.precision not in _DTYPES:
            raise ValueError(f"train.precision={self.precision!r}; choose fp32, bf16 or fp16")
        if (self.precision == "bf16" and self.device.type == "cuda"
                and torch.cuda.get_device_capability(self.device) < (8, 0)):
            raise ValueError(f"train.precision=bf16: {torch.cuda.get_device_name(self.device)} (compute capability "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(self.device)))}) has no bf16 "
                             "kernels (they need 8.0+); use --train.precision fp16 (loss-scaled) or fp32")
        self.dtype = _DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def describe(self) -> str:
        """What runs in which precision, for the startup log."""
        if self.dtype is None:
            return "fp32 (no autocast)"
        if self.precision == "bf16":
            return ("bf16: the LSTM runs in bf16 (outside autocast, on bf16 copies of the fp32 weights), the rest "
                    "under bf16 autocast; fp32 master weights, gradients and optimizer state")
        lstm = ("fp32 (oneDNN has no fp16 LSTM on CPU)" if self.device.type == "cpu"
                else "fp16 (autocast's cuDNN RNN path)")
        return (f"fp16 autocast with a GradScaler: the LSTM runs in {lstm}; fp32 master weights, gradients and "
                "optimizer state")

    def autocast(self, *, cache: bool = True):
        """The forward's autocast context (none for fp32). `cache=False`: without autocast's cache of
        cast weights, which must not hand a tensor from one CUDA graph (or an eager step) to another
        (PyTorch's CUDA graphs notes, "Usage with torch.cuda.amp")."""
        if self.dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.device.type == "cpu" and self.dtype == torch.float16:
            # oneDNN has no fp16 LSTM kernel on CPU ("could not create a primitive descriptor");
            # the native kernel runs the LSTM in fp32 while the rest autocasts. fp16 on CPU exists to
            # exercise the GradScaler path anywhere; use bf16 for speed on CPU.
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=None if cache else False))
        return stack


def control_group(backend: str):
    """A gloo group for small host-side agreements (stop flags, token counts, plan hashes): on NCCL
    these would each force a GPU sync; on gloo they cost a few microseconds on the CPU."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD


def all_reduce_host(values: list[float], group, op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few host numbers over the control group (identity in one process)."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()
