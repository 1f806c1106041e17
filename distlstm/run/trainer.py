"""The training loop, shared by every task: `train_step`, evaluation, logging and checkpoint cadence."""

from __future__ import annotations

import math
import time
import dataclasses
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distlstm.config import Config, ConfigError
from distlstm.data.batch import Batch
from distlstm.data.errors import check_bad_fraction
from distlstm.errors import RunError
from distlstm.models.lstm import flops_per_token
from distlstm.run.optim import PlateauSchedule, make_optimizer
from distlstm.distributed.parallel import AmpPolicy, all_reduce_host, unwrap
from distlstm.run.bptt import RankState, StateCarrier
from distlstm.tasks import Task
from distlstm.distributed.world import World
from distlstm.run.best import Watch
from distlstm.run.step import TrainStep
from distlstm.checkpoint.codec import RngState


def lr_lambda(optim_cfg, max_steps: int):
    """Linear warmup, then cosine to min_lr_ratio at max_steps (or constant; plateau multiplies this)."""
    def factor(step: int) -> float:
        if optim_cfg.warmup_steps and step < optim_cfg.warmup_steps:
            return (step + 1) / optim_cfg.warmup_steps
        if optim_cfg.schedule in ("constant", "plateau") or not max_steps:
            return 1.0
        progress = min(1.0, (step - optim_cfg.warmup_steps) / max(1, max_steps - optim_cfg.warmup_steps))
        return optim_cfg.min_lr_ratio + (1 - optim_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_optimizer(model: nn.Module, optim_cfg, max_steps: int, device: torch.device):
    """optim.name (fused AdamW, Adam or SGD: each takes the non-finite flag as a tensor, so skipping a
    bad step needs no host sync; see distlstm/run/optim.py) with weight decay on matrices only, and the
    warmup + cosine / constant / plateau schedule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = make_optimizer(groups, optim_cfg)
    if optim_cfg.schedule == "plateau":
        scheduler = PlateauSchedule(optimizer, lr_lambda(optim_cfg, max_steps), factor=optim_cfg.plateau_factor,
                                    patience=optim_cfg.plateau_patience)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_cfg, max_steps))
    return optimizer, scheduler


@dataclass
class TrainState:
    """Counters saved in every checkpoint."""

    step: int = 0
    micro_steps: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    bad_samples: int = 0
    elapsed_s: float = 0.0
    best: dict = field(default_factory=dict)
    samples: int = 0
    """Samples trained on (bad_samples counts the ones skipped)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class NonFiniteError(RunError):
    """Too many consecutive non-finite steps; the message names the first non-finite module."""


def _stepper_attr(name: str) -> property:
    """`Trainer.<x>` for the step's `<name>` (tests and the loop read the device values there)."""
    return property(lambda self: getattr(self.stepper, name), lambda self, value: setattr(self.stepper, name, value))


class Trainer:
    """Owns the step. `main()` builds the pieces (see distlstm/train.py) and calls `fit()`."""

    def __init__(self, cfg: Config, world: World, *, model: nn.Module, optimizer, scheduler, amp: AmpPolicy,
                 device: torch.device, train_loader, valid_loader=None, control_group=None, reporter=None,
                 checkpoints=None, preempt=None, run_dir: Path | None = None, log=print):
        self.cfg, self.world, self.model, self.optimizer, self.scheduler = cfg, world, model, optimizer, scheduler
        self.amp, self.device, self.group = amp, device, control_group
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.reporter, self.checkpoints, self.preempt = reporter, checkpoints, preempt
        self.run_dir, self.log = run_dir, log
        self.task: Task = unwrap(model).spec
        self.state = TrainState()
        self.stepper = TrainStep(model=model, optimizer=optimizer, amp=amp, world_size=world.world_size,
                                 grad_clip=cfg.optim.grad_clip, carry=StateCarrier.for_loader(train_loader, device),
                                 device=device)
        """The step itself (distlstm/run/step.py), with the device values it updates in place."""
        self._pending_tokens = self._pending_skipped = self._pending_samples = 0
        self._clock = time.perf_counter()
        self.item_sum = 0.0
        """Real items of this rank since the last log interval (the loss_sum's denominator)."""
        self.last_eval_s = 0.0
        """Wall time of the latest evaluation (`evaluate`)."""
        self.last_micro: list[Batch] = []
        self.flops_per_token = flops_per_token(unwrap(model))
        if isinstance(scheduler, PlateauSchedule) and (valid_loader is None or not cfg.train.eval_every):
            raise ConfigError("optim.schedule=plateau reduces the lr when the validation loss stalls, so it needs "
                              "validation data (data.valid) and train.eval_every > 0; set them or use "
                              "optim.schedule=constant|cosine")
        self.graphs = None
        """A distlstm.run.graphs.StepGraphs when train.cuda_graphs is on: it runs the steps it can replay."""
        self.watch = Watch(cfg, self.task, has_valid=valid_loader is not None)

    # ------------------------------------------------------------------ the step
    # The device values the step updates in place (read at the log cadence) and what it runs on.
    loss_sum = _stepper_attr("loss_sum")
    grad_norm = _stepper_attr("grad_norm")
    bad_run = _stepper_attr("bad_run")
    skipped_dev = _stepper_attr("skipped")
    carry = _stepper_attr("carry")
    params = _stepper_attr("params")

    def train_step(self, micro_batches: list[Batch]) -> None:
        """One optimizer step over `micro_batches` (this rank's share of the global batch): replayed
        as CUDA graphs where StepGraphs can (every rank agreeing), else eagerly; the same step
        (distlstm/run/step.py) either way. The host counters and the LR schedule are kept here."""
        global_items = None
        if self.graphs is not None:
            outcome = self.graphs.step(micro_batches)
            if outcome.replayed:
                self.item_sum += outcome.items
                self.scheduler.step()
                return
            global_items = outcome.global_items  # summed in StepGraphs' agreement: one all-reduce per step
        self.forward_backward(micro_batches, global_items)
        self._optimizer_step()
        self.stepper.zero_grads(keep=self.graphs is not None)  # graphs hold the gradients' addresses

    def forward_backward(self, micro_batches: list[Batch], global_items: float | None = None) -> None:
        """Accumulate the step's gradient: d(sum of losses / global item count)/d(params). The item
        count of the whole step (all micro-batches on all ranks) is summed over ranks on the control
        group unless the caller has it (`global_items`)."""
        local_items = self.stepper.items(micro_batches)
        if global_items is None:
            (global_items,) = all_reduce_host([local_items], self.group)
        self.stepper.accumulate(micro_batches, global_items)
        self.item_sum += local_items

    def _optimizer_step(self) -> None:
        if self.stepper.optimize():
            # Advances here also for a step the fused optimizer skipped (non-finite): _flush_counters
            # takes those back off the schedule.
            self.scheduler.step()
        else:
            self.state.skipped_steps += 1  # fp16's GradScaler skipped it (overflow): the schedule stays

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        batches = iter(self.train_loader)
        interval = _Interval()
        self._clock = time.perf_counter()
        last_save = time.monotonic()
        result, stopped = {}, "finished"
        while not cfg.train.max_steps or self.state.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            micro = list(islice(batches, cfg.train.accum_steps))
            interval.data_wait += time.perf_counter() - t0
            if not micro:
                break  # max_epochs reached (every rank has the same batch count, so all stop here)
            for b in micro:
                interval.add(b)
                self._pending_tokens += b.num_tokens if b.weight else 0
                self._pending_skipped += b.num_skipped
                # Real rows only: bounded shapes pad batches with dummy rows (id -1).
                self._pending_samples += int((b.sample_ids >= 0).sum()) if b.weight else 0
            self.train_step(micro)
            self.last_micro = micro
            if cfg.log.sample_ids:
                self._record_samples(micro)
            self.state.step += 1
            self.state.micro_steps += len(micro)
            if self.reporter:
                self.reporter.advance()
            if self.state.step % cfg.log.every_steps == 0:
                self._log_interval(interval)
                interval = _Interval()
            early = False
            if cfg.train.eval_every and self.state.step % cfg.train.eval_every == 0:
                result = self.evaluate()
                interval.eval_s += self.last_eval_s  # reported in the valid record, not as training time
                self._observe_plateau(result)
                early = self._after_eval(result)
            stop, due = self._agree_flags(last_save)
            if stop or due or (cfg.checkpoint.every_steps and self.state.step % cfg.checkpoint.every_steps == 0):
                self.save()
                last_save = time.monotonic()
            if stop:
                return {"stopped": "preempted", "step": self.state.step}
            if early:
                self.log(f"early stop at step {self.state.step}: no better {cfg.train.early_stop_metric} in "
                         f"{cfg.train.early_stop_patience} evaluations (train.early_stop_patience)")
                stopped = "early_stop"
                break
        if interval.steps:
            self._log_interval(interval)
        self._flush_counters()
        self._check_bad_fraction(final=True)  # before the final evaluation and checkpoint of a garbage run
        if not cfg.train.eval_every or self.state.step % cfg.train.eval_every or not result:
            result = self.evaluate()
            self._after_eval(result, cadence=False)
        if cfg.checkpoint.at_end:
            self.save()
        self._flush_counters()
        return {"stopped": stopped, "step": self.state.step, **result}

    def _after_eval(self, result: dict, cadence: bool = True) -> bool:
        """Keep the best checkpoint (a save now, protected from retention) and tell whether early
        stopping says stop. Every rank has the same all-reduced result, so all decide alike."""
        improved, stop = self.watch.update(self.state.best, result, self.state.step, cadence=cadence)
        if improved and self.checkpoints is not None:
            self.checkpoints.mark_best(self.state.step)
            self.save()
        return stop

    def _flush_counters(self, skipped_steps: int | None = None) -> None:
        """Bring the run counters up to date (at the log cadence and before every save, so a
        checkpoint holds exact totals): tokens and skipped samples summed over ranks, skipped
        optimizer steps (which also come off the LR schedule), wall time. `skipped_steps`: the
        device counter already read by the caller (`_log_interval`'s one read), else read here."""
        if skipped_steps is None:
            skipped_steps = int(self.skipped_dev)
        self.skipped_dev.zero_()
        tokens, skipped, samples = all_reduce_host(
            [self._pending_tokens, self._pending_skipped, self._pending_samples], self.group)
        self._pending_tokens = self._pending_skipped = self._pending_samples = 0
        self.state.tokens += int(tokens)
        self.state.bad_samples += int(skipped)
        self.state.samples += int(samples)
        if skipped_steps:
            self.state.skipped_steps += skipped_steps
            self.scheduler.last_epoch -= skipped_steps
        now = time.perf_counter()
        self.state.elapsed_s += now - self._clock
        self._clock = now
        self._check_bad_fraction(final=False)

    def _check_bad_fraction(self, *, final: bool) -> None:
        """data.max_bad_fraction, on counts summed over ranks (so every rank stops at the same step)."""
        if self.state.bad_samples or final:
            quarantine = self.run_dir / "quarantine" if self.run_dir is not None else None
            check_bad_fraction(self.state.bad_samples, self.state.samples, self.cfg.data.max_bad_fraction,
                               final=final, quarantine_dir=quarantine)

    def _record_samples(self, micro: list[Batch]) -> None:
        """One line per step: `step epoch id id ...` (filler batches, weight 0, left out); a step whose
        micro-batches straddle an epoch boundary gets a line for each epoch it has samples of."""
        if self.run_dir is None:
            return
        path = self.run_dir / "samples" / f"rank{self.world.rank:05d}.txt"
        path.parent.mkdir(exist_ok=True)
        by_epoch: dict[int, list[str]] = {}
        for b in micro:
            # Dummy rows (bounded shapes) have id -1: not samples.
            by_epoch.setdefault(b.epoch, []).extend(str(i) for i in (b.sample_ids.tolist() if b.weight else [])
                                                    if i >= 0)
        with open(path, "a") as f:
            for epoch, ids in by_epoch.items():
                if ids or epoch == micro[-1].epoch:
                    f.write(f"{self.state.step} {epoch} {' '.join(ids)}\n")

    def _agree_flags(self, last_save: float) -> tuple[bool, bool]:
        """(preempted, time-based save due), agreed by all ranks so they all save at the same step."""
        every_min = self.cfg.checkpoint.every_minutes
        preempted = float(self.preempt.requested) if self.preempt is not None else 0.0
        due = float(bool(every_min) and time.monotonic() - last_save >= every_min * 60)
        if self.group is None or (self.preempt is None and not every_min):
            return bool(preempted), bool(due)
        preempted, due = all_reduce_host([preempted, due], self.group, op=dist.ReduceOp.MAX)
        return bool(preempted), bool(due)

    def _log_interval(self, interval: "_Interval") -> None:
        """The one place the step's device values reach the host (besides fp16's scale check)."""
        # Read first, time after. On a GPU the host runs ahead of the kernels (with CUDA graphs, one
        # launch per step, by up to log.every_steps steps) and this read waits for them: the time
        # taken before it would measure how fast steps were queued, not how fast they ran.
        loss_sum, bad_run, grad_norm, skipped_steps = self._read_device_values()
        # Evaluation inside the interval is not training time (the valid record has its eval_s).
        elapsed = time.perf_counter() - interval.started - interval.eval_s
        sums = all_reduce_host([loss_sum, self.item_sum, interval.real, interval.padded, interval.skipped],
                               self.group)
        self.loss_sum.zero_()
        self.item_sum = 0.0
        self._flush_counters(skipped_steps)
        if bad_run >= self.cfg.train.max_bad_steps:
            raise NonFiniteError(self._diagnose_nonfinite(bad_run))
        values = {"loss": sums[0] / max(sums[1], 1.0), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "tokens_per_s": sums[2] / max(elapsed, 1e-9),
                  # Real tokens of the interval, all ranks: with the records' times (taken after the
                  # device read above, so after the interval's steps ran) a wall-clock rate over any span.
                  "tokens": int(sums[2]),
                  "padding": 1.0 - sums[2] / max(sums[3], 1.0), "data_wait": interval.data_wait / max(elapsed, 1e-9),
                  "skipped_samples": int(sums[4]), "epoch": self.train_loader.epoch,
                  # Model FLOPs on real tokens (padding excluded), all ranks: divide by the peak for MFU.
                  "tflops": self.flops_per_token * sums[2] / max(elapsed, 1e-9) / 1e12}
        if self.amp.scaler is not None:
            values["loss_scale"] = self.amp.scaler.get_scale()
        if self.reporter:
            self.reporter.log("train", self.state.step, values)

    def _read_device_values(self) -> tuple[float, int, float, int]:
        """(summed loss, consecutive non-finite steps, last gradient norm, skipped optimizer steps):
        one device->host copy for the four, so one wait for the queued steps instead of four."""
        values = torch.stack([self.loss_sum, self.bad_run.double(), self.grad_norm.double(),
                              self.skipped_dev.double()]).tolist()
        return values[0], int(values[1]), values[2], int(values[3])

    def _diagnose_nonfinite(self, bad_run: int) -> str:
        """Re-run the last micro-batch with hooks to name the first module whose output or gradient
        is not finite."""
        model = unwrap(self.model)
        found: list[str] = []
        hooks = []
        for name, module in model.named_modules():
            def fwd(mod, inp, out, name=name):
                t = out[0] if isinstance(out, tuple) else out
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() and not found:
                    found.append(f"output of module '{name or 'model'}' ({type(mod).__name__})")
            hooks.append(module.register_forward_hook(fwd))
        for name, p in model.named_parameters():
            hooks.append(p.register_hook(lambda g, name=name: found.append(f"gradient of '{name}'")
                                         if not torch.isfinite(g).all() and not found else None))
        try:
            batch = self.last_micro[-1].to(self.device)
            with self.amp.autocast():
                out = model(batch.inputs, batch.lengths)
            loss_sum, _, _ = self.task.loss_and_metrics(out, batch.targets, batch.lengths)
            if not found and not torch.isfinite(loss_sum):
                found.append("the loss")
            loss_sum.backward()
        finally:
            for h in hooks:
                h.remove()
            self.optimizer.zero_grad(set_to_none=True)
        where = found[0] if found else "no module on the last micro-batch (an earlier batch?)"
        return (f"{bad_run} consecutive optimizer steps had a non-finite gradient (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); first non-finite value: {where}; try a lower optim.lr, "
                f"optim.grad_clip, or train.precision bf16/fp32, and check the data for extreme values")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """The validation summary (keys `valid_*`); its record also has `eval_s`, the evaluation's wall
        time, which `fit` keeps out of the training interval's throughput (`self.last_eval_s`)."""
        self.last_eval_s = 0.0
        if self.valid_loader is None:
            return {}
        if self.device.type == "cuda":
            # Training steps still queued on the device are training time: let them finish first.
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        values = evaluate_model(self.model, self.valid_loader, amp=self.amp, device=self.device, group=self.group,
                                max_batches=self.cfg.train.eval_max_batches)
        # evaluate_model ends with a host read of its sums, so its work is done by now.
        self.last_eval_s = time.perf_counter() - started
        if self.reporter:
            self.reporter.log("valid", self.state.step, {**values, "eval_s": self.last_eval_s})
        return {f"valid_{k}": v for k, v in values.items()}

    def _observe_plateau(self, result: dict) -> None:
        """optim.schedule=plateau: feed it the validation loss of a cadence evaluation (all ranks see
        the same all-reduced loss, so they reduce together). The end-of-run evaluation is left out, so a
        run resumed from its final checkpoint with a larger train.max_steps continues like a longer run."""
        if isinstance(self.scheduler, PlateauSchedule) and "valid_loss" in result:
            plateau = self.scheduler
            if plateau.observe(result["valid_loss"]):
                best = "no finite loss yet" if plateau.best is None else f"best {plateau.best:.4f}"
                self.log(f"step {self.state.step}: validation loss {result['valid_loss']:.4f} ({best}), no new best "
                         f"for {plateau.patience} evaluation(s): lr x {plateau.factor} -> {plateau.get_last_lr()[0]:.4g}")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        """What a checkpoint holds, as components the CheckpointManager saves and restores in place."""
        extra = {"train": self.state, "scheduler": self.scheduler, "loader": self.train_loader}
        if self.amp.scaler is not None:
            extra["scaler"] = self.amp.scaler
        # The carried LSTM state (lm stream mode) is per rank, like the RNG: restored only on the same world size.
        rank_state = RankState(rng=RngState(), carry=self.carry) if self.carry.stream else RngState()
        return {"model": self.model, "optim": self.optimizer, "extra": extra, "rank_state": rank_state}

    def save(self) -> None:
        if self.checkpoints is None or getattr(self, "_saved_step", None) == self.state.step:
            return  # e.g. the end of a run whose last step was also a cadence step
        self._flush_counters()
        self.checkpoints.save(self.state.step, self.checkpoint_state())
        self._saved_step = self.state.step

    def resumed(self, loaded: dict) -> None:
        """After CheckpointManager.load_* restored the components of `checkpoint_state()` in place."""
        # This step is already checkpointed. Saving it again (at_end, when the run was killed after
        # its last checkpoint but before final.json) would set the good copy aside first, and a kill
        # then would leave no checkpoint at all (with keep_last=1).
        self._saved_step = self.state.step
        if self.checkpoints is not None:
            self.checkpoints.best_step = self.watch.best_step(self.state.best)
        if not loaded["rank_state_restored"]:
            # Elastic resume: this rank had no counterpart; derive a fresh RNG stream from the seed.
            torch.manual_seed(self.cfg.train.seed + 1000 * self.world.rank + self.state.step)


class _Interval:
    """Host-side counts over one log interval."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.real = self.padded = self.skipped = 0
        self.data_wait = 0.0
        self.eval_s = 0.0
        """Seconds of evaluation inside the interval: not training time."""
        self.steps = 0

    def add(self, batch: Batch) -> None:
        self.steps += 1
        if batch.weight:
            self.real += batch.num_tokens
            self.padded += batch.padded_tokens
        self.skipped += batch.num_skipped


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, *, amp: AmpPolicy, device: torch.device, group=None,
                   max_batches: int = 0) -> dict:
    """The task's summary (loss and its metric, `items`) of `model` over all of `loader` (at most
    `max_batches` per rank), summed over the ranks of `group`. Rewinds the loader afterwards."""
    model = unwrap(model)
    task: Task = model.spec
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, items, the task's summed metric
    batches = 0
    # lm stream mode: the state is carried over the whole validation stream, from zero at its start.
    carry = StateCarrier.for_loader(loader, device)
    for batch in loader:
        if max_batches and batches >= max_batches:
            break
        batches += 1
        batch_dev = batch.to(device, non_blocking=True)
        for piece in carry.pieces(batch_dev, batch):
            with amp.autocast():
                out = carry.forward(model, piece)
            loss, count, metrics = task.loss_and_metrics(out, piece.targets, piece.lengths)
            metric = metrics[task.metric_sum] if task.metric_sum else torch.zeros((), device=device)
            sums += torch.stack([loss.double(), count.double(), metric.double()]) * batch.weight
    loader.rewind()
    model.train(was_training)
    loss_v, count_v, metric_v = all_reduce_host(sums.tolist(), group)
    summary = task.summary(loss_v, count_v, metric_v, num_targets=getattr(model, "num_targets", 1))
    return {"loss": summary.pop("loss"), "items": int(count_v), **summary}
