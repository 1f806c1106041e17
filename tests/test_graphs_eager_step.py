"""An eager step with CUDA graphs on does one host all-reduce, as a step without graphs does (issue 18,
defect 9).

A failure means StepGraphs.step's agreement all-reduce (the step's item count and "every rank can
replay") is followed by a second all-reduce of the same item count in the eager step: one more gloo
round trip on every warm-up, fallback and unseen-shape step. Runs the real StepGraphs.step on CPU
with a real one-rank gloo group, on the CPU graph backend of tests/fake_graphs.py (the eager path
records no graph anyway).
"""

import torch
import torch.distributed as dist

from distlstm.run.graphs import StepGraphs
from tests._step_worker import make_batches
from tests.fake_graphs import FakeGraphs
from tests.test_trainer_step import make_trainer


def eager_only_graphs(trainer) -> StepGraphs:
    """A StepGraphs in the state of a run's first steps: nothing captured, no shape seen yet."""
    return StepGraphs(trainer, limit=4, log=lambda m: None, backend=FakeGraphs())


def test_eager_step_with_graphs_on_all_reduces_once(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        real, calls = dist.all_reduce, []
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **kw: calls.append(t.clone()) or real(t, *a, **kw))
        batches = make_batches("classify", 2)
        counts, weights = {}, {}
        for graphs_on in (False, True):
            trainer = make_trainer("fp32")  # seeded: the same initial weights
            trainer.group = dist.group.WORLD
            trainer.graphs = eager_only_graphs(trainer) if graphs_on else None
            calls.clear()
            trainer.train_step(batches)
            counts[graphs_on] = len(calls)
            weights[graphs_on] = [p.detach().clone() for p in trainer.model.parameters()]
            assert trainer.scheduler.last_epoch == 1 and (not graphs_on or trainer.graphs.eager_steps == 1)
        assert counts == {False: 1, True: 1}
        # The item count the eager step used is the one StepGraphs reduced: the same update.
        assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))
    finally:
        dist.destroy_process_group()
