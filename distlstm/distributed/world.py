"""Where this process sits in the job: read once from torchrun / SLURM / nothing into a frozen World.

This is the only module that reads RANK, WORLD_SIZE, LOCAL_RANK or SLURM_* variables. Everything
else takes `world` (or `dp_rank` / `dp_world_size`) as an argument.

Detection order:
1. torchrun (RANK and WORLD_SIZE set): torchrun owns the rendezvous and sets MASTER_ADDR/PORT.
2. SLURM job step (`srun python -m distlstm.train`: SLURM_STEP_ID and SLURM_PROCID set). The batch
   script itself also has SLURM_PROCID=0 and SLURM_NTASKS=N but no SLURM_STEP_ID; treating it as
   rank 0 of N would hang waiting for ranks that never start, so it counts as a single process.
3. Single process.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping

import torch

log = logging.getLogger(__name__)

# Ports derived from SLURM_JOB_ID land here: above the common service ports, below the Linux
# ephemeral range (32768+), so a client socket cannot already hold the port.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    mode: str  # "single" | "torchrun" | "slurm"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE = World(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1,
               mode="single")


def slurm_master_port(job_id: int) -> int:
    """Same job id -> same port on every node; launch/slurm/*.sbatch use the same formula."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


# ---------------------------------------------------------------------------------------- parsing


def _int(env: Mapping[str, str], name: str, default: int | None = None, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set; the launcher should set it")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE syntax: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse tasks-per-node {spec!r}: bad item {part!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise ValueError(f"unbalanced ']' in {s!r}")
        if ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {s!r}")
    return parts + [s[start:]]


def _expand_one(pattern: str) -> list[str]:
    """'a[1-2]-ib' -> ['a1-ib', 'a2-ib']; several bracket groups expand as a product."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", pattern):
            raise ValueError(f"bad hostname {pattern!r}")
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    values: list[str] = []
    for item in m.group(1).split(","):
        r = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not r:
            raise ValueError(f"bad range {item!r} in {pattern!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in {pattern!r}")
        width = len(lo) if lo.startswith("0") else 0  # node[01-04] keeps the zero padding
        values += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return [h for v in values for h in _expand_one(head + v + tail)]


def parse_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: 'node[01-04,07]' -> node01..node04, node07; 'a[1-2]-ib,b3'."""
    hosts = [h for part in _split_top_level(nodelist.strip()) for h in _expand_one(part.strip())]
    if not hosts:
        raise ValueError(f"empty hostlist {nodelist!r}")
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames`: the fallback for hostlist syntax parse_hostlist does not know."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise ValueError(f"cannot expand SLURM nodelist {nodelist!r}: {err}") from None
    if not out:
        raise ValueError(f"scontrol show hostnames {nodelist!r} printed nothing")
    return out


# -------------------------------------------------------------------------------------- detection


def detect_world(env: Mapping[str, str] = os.environ, *,
                 expand_hostnames: Callable[[str], list[str]] = scontrol_hostnames) -> World:
    """Read the rank layout from torchrun, else a SLURM job step, else a single process.

    `expand_hostnames` is asked only for a nodelist that parse_hostlist cannot parse.
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return _from_slurm(env, expand_hostnames)
    return SINGLE


def _from_torchrun(env: Mapping[str, str]) -> World:
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            raise ValueError(f"{name} is not set but {'WORLD_SIZE' if name == 'RANK' else 'RANK'} "
                             "is; launch with torchrun or set both")
    world_size = _int(env, "WORLD_SIZE", minimum=1)
    rank = _int(env, "RANK")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world_size, minimum=1)
    local_rank = _int(env, "LOCAL_RANK", rank % local_world)
    num_nodes = _int(env, "GROUP_WORLD_SIZE", -(-world_size // local_world), minimum=1)
    node_rank = _int(env, "GROUP_RANK", rank // local_world)
    port = env.get("MASTER_PORT")
    world = World(rank=rank, local_rank=local_rank, world_size=world_size,
                  local_world_size=local_world, node_rank=node_rank, num_nodes=num_nodes,
                  mode="torchrun", master_addr=env.get("MASTER_ADDR"),
                  master_port=_int(env, "MASTER_PORT", minimum=1) if port else None)
    if world.is_distributed and (world.master_addr is None or world.master_port is None):
        raise ValueError("MASTER_ADDR and MASTER_PORT must be set for a multi-process run "
                         "(torchrun sets them; set them yourself when launching by hand)")
    _check(world, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    return world


def _from_slurm(env: Mapping[str, str], expand: Callable[[str], list[str]]) -> World:
    # Inside a step the STEP_* variables describe the step, which may use fewer tasks or nodes
    # than the job; fall back to the job-level names.
    ntasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    nnodes_var = "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in env else "SLURM_NNODES"
    world_size = _int(env, ntasks_var, minimum=1)
    num_nodes = _int(env, nnodes_var, 1, minimum=1)
    node_rank = _int(env, "SLURM_NODEID", 0)
    local_world_var, local_world = _slurm_local_world_size(env, node_rank, num_nodes, world_size)
    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if env.get(v)), None)
    if nodelist_var is None:
        raise ValueError("SLURM_JOB_NODELIST is not set; run the trainer with srun inside a job")
    try:
        master_addr = parse_hostlist(env[nodelist_var])[0]
    except ValueError as err:
        log.warning("%s=%r: %s; asking scontrol", nodelist_var, env[nodelist_var], err)
        master_addr = expand(env[nodelist_var])[0]
    if env.get("MASTER_PORT"):
        master_port = _int(env, "MASTER_PORT", minimum=1)
    else:
        master_port = slurm_master_port(_int(env, "SLURM_JOB_ID"))
    world = World(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0),
                  world_size=world_size, local_world_size=local_world, node_rank=node_rank,
                  num_nodes=num_nodes, mode="slurm", master_addr=master_addr,
                  master_port=master_port)
    _check(world, "SLURM_PROCID", ntasks_var, "SLURM_LOCALID", local_world_var, "SLURM_NODEID",
           nnodes_var)
    return world


def _slurm_local_world_size(env, node_rank: int, num_nodes: int, world_size: int):
    """Tasks on this node, from the tasks-per-node string (handles uneven '2(x3),1')."""
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(var):
            try:
                counts = parse_tasks_per_node(env[var])
            except ValueError as err:
                raise ValueError(f"environment variable {var}: {err}") from None
            if len(counts) != num_nodes or sum(counts) != world_size:
                raise ValueError(f"environment variable {var}={env[var]!r} describes {len(counts)} "
                                 f"nodes / {sum(counts)} tasks, but the step has {num_nodes} "
                                 f"nodes / {world_size} tasks")
            if node_rank >= len(counts):
                raise ValueError(f"SLURM_NODEID={node_rank} but {var}={env[var]!r} lists "
                                 f"{len(counts)} nodes")
            return var, counts[node_rank]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return "SLURM_NTASKS_PER_NODE", _int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    return "SLURM_NTASKS", world_size if num_nodes == 1 else -(-world_size // num_nodes)


def _check(w: World, rank_var, size_var, local_rank_var, local_size_var, node_var, nodes_var=None):
    """Inconsistent layouts fail here, naming the variables, instead of hanging in rendezvous."""
    if not w.rank < w.world_size:
        raise ValueError(f"{rank_var}={w.rank} must be < {size_var}={w.world_size}")
    if not w.local_rank < w.local_world_size:
        raise ValueError(f"{local_rank_var}={w.local_rank} must be < "
                         f"{local_size_var}={w.local_world_size}")
    if w.local_world_size > w.world_size:
        raise ValueError(f"{local_size_var}={w.local_world_size} must be <= "
                         f"{size_var}={w.world_size}")
    if nodes_var and not w.node_rank < w.num_nodes:
        raise ValueError(f"{node_var}={w.node_rank} must be < {nodes_var}={w.num_nodes}")


def describe(world: World) -> str:
    """One line for the leader's log, e.g. 'world: slurm, 8 ranks on 2 nodes (4/node), ...'."""
    if not world.is_distributed:
        return f"world: {world.mode}, 1 process"
    return (f"world: {world.mode}, {world.world_size} ranks on {world.num_nodes} node(s) "
            f"({world.local_world_size}/node), rank {world.rank} = node {world.node_rank} "
            f"local {world.local_rank}, master {world.master_addr}:{world.master_port}")


# ---------------------------------------------------------------------------------- process group


def default_device(world: World) -> torch.device:
    """cuda:<local_rank> when CUDA is visible (modulo the visible count, for --gpus-per-task), else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(world: World, *, backend: str, timeout_s: float,
                       device: torch.device | None = None, alone: bool = False) -> None:
    """Join the process group (no-op for one process, unless `alone`: then a group of one, with an
    in-process store, for train.ddp=on). `timeout_s` bounds rendezvous and every collective, so a
    dead rank fails the job instead of hanging it until the wall-clock limit."""
    import torch.distributed as dist

    if not world.is_distributed and not alone:
        return
    if world.mode == "slurm":
        # env:// rendezvous reads these; torchrun sets them itself, srun does not.
        os.environ["MASTER_ADDR"] = str(world.master_addr)
        os.environ["MASTER_PORT"] = str(world.master_port)
    kwargs = {}
    if backend == "nccl":
        if device is None or device.type != "cuda":
            raise ValueError(f"backend 'nccl' needs a cuda device, got {device}; use backend 'gloo'")
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if not world.is_distributed:
        # One process: nobody to meet, so no rendezvous address (a launcher may not have set one).
        kwargs["store"] = dist.HashStore()
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


_retired_groups: list = []
"""Default process groups left by `destroy_process_group`, released at exit (see there)."""
atexit.register(_retired_groups.clear)


def destroy_process_group(*, barrier: bool = False) -> None:
    """Leave the process group. `barrier=True` (on the success path only: after a failure a peer
    may be gone) first waits for every rank, so no rank tears down its connections while another
    is still inside a collective with it (gloo aborts the process when that happens).

    The group object itself is kept until exit. A DDP model that outlives this call holds the group
    through its C++ Reducer, and the Reducer's deallocation keeps the GIL: when it drops the last
    reference, the group's destructor joins gloo's worker threads with the GIL held while one of them
    still needs it to free the barrier's work, and the process hangs at exit (seen in 2-rank gloo
    runs of tests/_step_worker.py, about 1 launch in 14 on a loaded 2-core machine; py-spy: main
    thread in ~Reducer -> ~ProcessGroupGloo -> thread::join, the gloo thread in ~AsyncWork ->
    gil_scoped_acquire). Released by atexit instead, with the interpreter alive, through the group's
    binding, which lets go of the GIL while it joins."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        _retired_groups.append(dist.group.WORLD)
        dist.destroy_process_group()
