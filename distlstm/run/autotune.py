"""Settings whose best value depends on the device, resolved once the model is on it:
`train.cuda_graphs`, `data.shape_buckets` and `data.max_tokens` ("auto").

- train.cuda_graphs=auto: on for a CUDA device with a model and precision that can be captured
  (distlstm/run/graphs.py `graphs_decision`), off otherwise (always off on CPU).
- data.shape_buckets=auto: 64 bounded shapes when graphs are on (what a graph per shape needs; the
  count is justified in docs/design.md, "Bounded shapes"), else 0 (pad to each batch's longest).
- data.max_tokens=auto: on CPU the default budget (8192); on CUDA the largest budget whose step
  fits in the GPU's memory, found by a short probe (forward + backward at the budget's extreme
  shapes, doubling, then bisecting; capped at AUTO_MAX_TOKENS), agreed across ranks (the smallest
  wins) and written to the run directory, so a resumed run plans its batches exactly as before.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from distlstm.config import AUTO, Config
from distlstm.run.graphs import graphs_decision
from distlstm.distributed.parallel import AmpPolicy, all_reduce_host

GRAPH_SHAPE_BUCKETS = 64
AUTO_MAX_TOKENS = 262_144
"""The probe stops here: LSTM throughput stops growing at about 1024 rows per batch on H100/H200,
and larger batches only mean fewer optimizer steps per epoch."""
MEMORY_FRACTION = 0.85
"""Share of the GPU's memory a step may plan for (the rest: allocator fragmentation, cuDNN and
cuBLAS workspaces, NCCL buffers, the loader's pinned batches)."""
PROBE_MIN_TOKENS = 8192
AUTO_FILE = "auto.json"


def resolve_auto(cfg: Config, *, device: torch.device, model: torch.nn.Module, amp: AmpPolicy, group=None,
                 run_dir: Path | None = None, log=print) -> Config:
    """`cfg` with every "auto" replaced by its value for `device` (train.cuda_graphs becomes on/off)."""
    graphs, why = graphs_decision(cfg, device, world_size=dist.get_world_size(group) if group is not None else 1)
    if device.type == "cuda" or cfg.train.cuda_graphs != "auto":
        log(f"cuda graphs: {'on' if graphs else 'off'} ({why})")
    data = cfg.data
    shape_buckets = data.shape_buckets
    if shape_buckets == AUTO:
        shape_buckets = GRAPH_SHAPE_BUCKETS if graphs else 0
    max_tokens = data.max_tokens
    if max_tokens == AUTO:
        max_tokens = _auto_max_tokens(cfg, device=device, model=model, amp=amp, graphs=graphs, group=group,
                                      run_dir=run_dir, log=log)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(data, shape_buckets=shape_buckets, max_tokens=max_tokens),
        train=dataclasses.replace(cfg.train, cuda_graphs="on" if graphs else "off"))


def _auto_max_tokens(cfg: Config, *, device, model, amp, graphs: bool, group, run_dir, log) -> int:
    if device.type != "cuda":
        budget = cfg.data.host_defaults().max_tokens
        log(f"data.max_tokens=auto: {budget} (no GPU)")
        return budget
    saved = Path(run_dir) / AUTO_FILE if run_dir is not None else None
    if saved is not None and saved.is_file() and cfg.checkpoint.resume != "never":
        # A resumed run must plan its batches exactly as before (the loader refuses another plan).
        budget = int(json.loads(saved.read_text())["max_tokens"])
        note = f"chosen when this run started, {saved}"
    else:
        budget, note = probe_max_tokens(cfg, model=model, amp=amp, device=device, graphs=graphs)
    # Every rank takes part, whatever it found (a node-local run directory may lack the file): the
    # plan must be the same on all ranks.
    (lowest,) = all_reduce_host([-float(budget)], group, op=dist.ReduceOp.MAX)
    budget = int(-lowest)
    log(f"data.max_tokens=auto: {budget} ({note}{'; the smallest over the ranks' if group is not None else ''})")
    if saved is not None and (group is None or dist.get_rank() == 0):
        saved.write_text(json.dumps({"max_tokens": budget}))
    return budget


def probe_max_tokens(cfg: Config, *, model: torch.nn.Module, amp: AmpPolicy, device: torch.device,
                     graphs: bool) -> tuple[int, str]:
    """(largest budget that fits, how it was found). The model's weights, gradients and RNG streams
    are left as they were. With CUDA graphs a step's intermediates can live twice (the graphs' pool
    and an eager step's), so they count double."""
    free, total = torch.cuda.mem_get_info(device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # The optimizer's state (at most two moments, as Adam/AdamW keep) is not allocated yet: plan for it.
    fixed = torch.cuda.memory_allocated(device) + 2 * params
    room = MEMORY_FRACTION * total - fixed
    rng = torch.cuda.get_rng_state(device), torch.get_rng_state()

    def fits(budget: int) -> tuple[bool, float]:
        peak = 0.0
        for rows, length in _extreme_shapes(cfg, budget):
            step_bytes = _step_peak(cfg, model, amp, device, rows, length)
            if step_bytes is None:
                return False, float("inf")
            peak = max(peak, step_bytes)
        need = peak * (2 if graphs else 1)
        return need <= room, need

    try:
        good, bad, need = None, None, 0.0
        budget = PROBE_MIN_TOKENS
        while budget <= AUTO_MAX_TOKENS:
            ok, need_b = fits(budget)
            if not ok:
                bad = budget
                break
            good, need = budget, need_b
            budget *= 2
        if good is None:
            return PROBE_MIN_TOKENS, (f"even {PROBE_MIN_TOKENS} tokens need more than {room / 2**30:.1f} GiB; "
                                      f"using it anyway, set data.max_tokens lower if the run runs out of memory")
        if bad is not None:
            for _ in range(2):  # bisect twice: within a quarter of the last doubling
                mid = (good + bad) // 2 // 1024 * 1024
                ok, need_m = fits(mid)
                good, bad, need = (mid, bad, need_m) if ok else (good, mid, need)
        limit = f"{bad} did not fit" if bad is not None else f"the cap is {AUTO_MAX_TOKENS}"
        return good, (f"a step at {good} tokens needs ~{need / 2**30:.1f} GiB of {room / 2**30:.1f} GiB free for "
                      f"steps{' (x2 with CUDA graphs)' if graphs else ''}; {limit}")
    finally:
        torch.cuda.set_rng_state(rng[0], device)
        torch.set_rng_state(rng[1])
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def _extreme_shapes(cfg: Config, budget: int) -> list[tuple[int, int]]:
    """The budget's most memory-hungry batches: the longest rows, and the most rows (short lengths)."""
    d = cfg.data

    def rows(length: int) -> int:
        r = max(d.min_batch_size, budget // length)
        return min(r, d.max_batch_size) if d.max_batch_size else r

    short = min(16, d.max_length)
    return [(rows(d.max_length), d.max_length), (rows(short), short)]


def _step_peak(cfg: Config, model, amp: AmpPolicy, device, rows: int, length: int) -> float | None:
    """Peak bytes a forward + backward at (rows, length) adds, or None when it does not fit."""
    inputs, lengths, targets = _random_batch(model, rows, length, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    try:
        with amp.autocast():
            outputs = model(inputs, lengths)
        loss, _, _ = model.spec.loss_and_metrics(outputs, targets, lengths)
        loss.backward()
        del outputs, loss
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def _random_batch(model, rows: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    if model.embedding is not None:
        inputs = torch.randint(0, model.embedding.num_embeddings, (rows, length), device=device, generator=gen)
    else:
        inputs = torch.randn(rows, length, model.lstm.input_size, device=device, generator=gen)
    lengths = torch.full((rows,), length, dtype=torch.int64, device=device)
    out = model.head.out_features
    if model.spec.per_step:
        targets = torch.randint(0, out, (rows, length), device=device, generator=gen)
    elif model.spec.needs_classes:
        targets = torch.randint(0, out, (rows,), device=device, generator=gen)
    else:  # regression
        targets = torch.randn((rows, out) if out > 1 else (rows,), device=device, generator=gen)
    return inputs, lengths, targets
