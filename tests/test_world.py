"""detect_world as a pure function of the environment.

A failure here means a launcher layout is misread: ranks that disagree about the world size hang
in rendezvous, two ranks reading the same shard, or a batch script treated as rank 0 of N.
"""

import pytest

from distlstm.distributed.world import (SINGLE, World, describe, detect_world, parse_hostlist,
                            parse_tasks_per_node, slurm_master_port)


def no_scontrol(nodelist):
    raise AssertionError(f"scontrol should not be needed for {nodelist!r}")


def torchrun_env(**over):
    env = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", GROUP_RANK="1",
               GROUP_WORLD_SIZE="2", MASTER_ADDR="node01", MASTER_PORT="29500")
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def srun_env(**over):
    """What `srun` sets for task 5 of 8 over nodes node[01-04,07] (2+2+2+1+1 tasks)."""
    env = dict(SLURM_JOB_ID="123456", SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_LOCALID="1",
               SLURM_NODEID="2", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", SLURM_NNODES="5",
               SLURM_STEP_NUM_NODES="5", SLURM_JOB_NODELIST="node[01-04,07]",
               SLURM_STEP_NODELIST="node[01-04,07]", SLURM_TASKS_PER_NODE="2(x3),1(x2)",
               SLURM_STEP_TASKS_PER_NODE="2(x3),1(x2)")
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_single_process_when_nothing_is_set():
    world = detect_world({}, expand_hostnames=no_scontrol)
    assert world == SINGLE and world.is_leader and not world.is_distributed
    assert describe(world) == "world: single, 1 process"


def test_torchrun():
    w = detect_world(torchrun_env(), expand_hostnames=no_scontrol)
    assert w == World(rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1,
                      num_nodes=2, mode="torchrun", master_addr="node01", master_port=29500)
    assert w.is_distributed and not w.is_leader
    assert "torchrun" in describe(w) and "8 ranks on 2 node" in describe(w)


def test_torchrun_wins_over_slurm():
    """`srun torchrun ...`: workers see both; torchrun's ranks are the real ones."""
    w = detect_world({**srun_env(), **torchrun_env()}, expand_hostnames=no_scontrol)
    assert w.mode == "torchrun" and w.rank == 5 and w.world_size == 8


def test_torchrun_minimal_env_derives_local_layout():
    w = detect_world(dict(RANK="3", WORLD_SIZE="4", MASTER_ADDR="h", MASTER_PORT="1"))
    assert (w.local_rank, w.local_world_size, w.node_rank, w.num_nodes) == (3, 4, 0, 1)


def test_srun_layout():
    w = detect_world(srun_env(), expand_hostnames=no_scontrol)
    assert w == World(rank=5, local_rank=1, world_size=8, local_world_size=2, node_rank=2,
                      num_nodes=5, mode="slurm", master_addr="node01",
                      master_port=slurm_master_port(123456))
    assert 20000 <= w.master_port < 30000


def test_srun_uneven_last_node_and_job_level_vars_only():
    env = srun_env(SLURM_PROCID="7", SLURM_LOCALID="0", SLURM_NODEID="4",
                   SLURM_STEP_TASKS_PER_NODE=None, SLURM_STEP_NUM_TASKS=None,
                   SLURM_STEP_NUM_NODES=None, SLURM_STEP_NODELIST=None)
    w = detect_world(env, expand_hostnames=no_scontrol)
    assert (w.rank, w.local_world_size, w.node_rank, w.master_addr) == (7, 1, 4, "node01")


def test_srun_ntasks_per_node_and_master_port_override():
    env = srun_env(SLURM_TASKS_PER_NODE=None, SLURM_STEP_TASKS_PER_NODE=None,
                   SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="4", SLURM_STEP_NUM_NODES="4",
                   SLURM_STEP_NODELIST="a[1-2]-ib,b3", MASTER_PORT="4242")
    w = detect_world(env, expand_hostnames=no_scontrol)
    assert (w.local_world_size, w.master_addr, w.master_port) == (2, "a1-ib", 4242)


def test_batch_script_is_single_process():
    """The batch shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but is not a step: not rank 0 of 2."""
    env = srun_env(SLURM_STEP_ID=None, SLURM_PROCID="0", SLURM_NTASKS="2")
    assert detect_world(env, expand_hostnames=no_scontrol) == SINGLE


def test_unparseable_nodelist_falls_back_to_injected_expander():
    seen = []
    w = detect_world(srun_env(SLURM_STEP_NODELIST="weird{1..2}"),
                     expand_hostnames=lambda s: seen.append(s) or ["first"])
    assert seen == ["weird{1..2}"] and w.master_addr == "first"


@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
    ("vm", ["vm"]),
    ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
    ("gpu[009-011],cpu1", ["gpu009", "gpu010", "gpu011", "cpu1"]),
])
def test_parse_hostlist(nodelist, hosts):
    assert parse_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node[a-b]", "node[3-1]", "", "x]"])
def test_parse_hostlist_rejects(bad):
    with pytest.raises(ValueError):
        parse_hostlist(bad)


@pytest.mark.parametrize("spec,counts", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,3", [1, 3])])
def test_parse_tasks_per_node(spec, counts):
    assert parse_tasks_per_node(spec) == counts


@pytest.mark.parametrize("env,names", [
    (torchrun_env(RANK="8"), ["RANK=8", "WORLD_SIZE=8"]),
    (torchrun_env(RANK="x"), ["RANK='x'", "not an integer"]),
    (torchrun_env(LOCAL_RANK="4"), ["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"]),
    (torchrun_env(WORLD_SIZE=None), ["WORLD_SIZE is not set"]),
    (torchrun_env(WORLD_SIZE="0"), ["WORLD_SIZE='0'", ">= 1"]),
    (torchrun_env(MASTER_ADDR=None), ["MASTER_ADDR"]),
    (srun_env(SLURM_PROCID="8"), ["SLURM_PROCID=8", "SLURM_STEP_NUM_TASKS=8"]),
    (srun_env(SLURM_STEP_TASKS_PER_NODE="2(x3)"), ["SLURM_STEP_TASKS_PER_NODE='2(x3)'", "3 nodes"]),
    (srun_env(SLURM_STEP_TASKS_PER_NODE="2(y3)"), ["SLURM_STEP_TASKS_PER_NODE", "2(y3)"]),
    (srun_env(SLURM_LOCALID="2"), ["SLURM_LOCALID=2"]),
    (srun_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None), ["SLURM_JOB_NODELIST"]),
    (srun_env(SLURM_JOB_ID=None), ["SLURM_JOB_ID is not set"]),
])
def test_bad_env_names_the_variable(env, names):
    with pytest.raises(ValueError) as err:
        detect_world(env, expand_hostnames=no_scontrol)
    for name in names:
        assert name in str(err.value)
