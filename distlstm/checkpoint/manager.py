"""Sharded, atomic, verified checkpoints of the whole train state.

Layout of ``run_dir``::

    step-000120/              committed checkpoint: only a directory with this exact name counts
        .metadata  __0_0.distcp  __1_0.distcp   DCP: model + optimizer tensors, one shard file per
                                                writing rank (replicated tensors written once)
        state.json            the non-tensor part of model/optimizer state (param_groups), rank 0
        extra.json            trainer state shared by all ranks (scheduler, scaler, loader, counters)
        rank-00000.json/.pt   per-rank state (RNG): JSON plus plain tensors (weights_only load)
        MANIFEST.json         size + sha256 of every file above; written last, before the rename
        MANIFEST.sig          HMAC of MANIFEST.json, only when DISTLSTM_CHECKPOINT_KEY is set
    step-000130.tmp/          a save in progress, or one that was killed; removed by the next save
    step-000100.deleting/     retention in progress, or killed mid-delete; removed by the next save
    latest                    name of the newest committed checkpoint, replaced atomically
    best                      name of the checkpoint checkpoint.keep_best keeps (outside keep_last)

Commit protocol: every rank writes into ``step-N.tmp``; each rank hashes the files it wrote; rank 0
gathers the digests, fsyncs every file, writes MANIFEST.json, fsyncs, renames ``.tmp`` to ``step-N``
(the commit point), fsyncs the parent and replaces ``latest``. A kill at any moment leaves either
the previous checkpoints untouched or a complete new one. Loading verifies every file against the
manifest and falls back to older checkpoints, naming what was wrong with each skipped one.

Use (every call on every rank, in the same order)::

    mgr = CheckpointManager(run_dir / "checkpoints", rank=r, world_size=n, async_save=True)
    loaded = mgr.load_latest(state)      # or mgr.load(path, state); None = fresh start
    ...  mgr.save(step, state)            # at checkpoint steps (async: returns after the CPU copy)
    mgr.close()                           # commits an in-flight async save

Nothing is unpickled freely: DCP's ``.metadata`` goes through an allow-list unpickler and every
``.pt`` through ``torch.load(weights_only=True)`` (distlstm/checkpoint/guard.py, part of
verification, so a planted file makes the checkpoint invalid and loading falls back to an older
one); everything else is JSON. With ``DISTLSTM_CHECKPOINT_KEY`` set, MANIFEST.json is signed
(``MANIFEST.sig``, HMAC-SHA256) and unsigned or mis-signed checkpoints are refused.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

from distlstm.checkpoint.guard import (SIGNATURE, SafeFileSystemReader, UnsafeCheckpointError, content_problems,
                                       signature)
from distlstm.data.sources import file_digest
from distlstm.errors import RunError, failure_text
from distlstm.checkpoint.codec import (  # noqa: F401  (rng_state, set_rng_state, tree_hash: public here too)
    cpu_copy, decode_tree, encode_tree, flatten_tree, merge_tree, rng_state, set_rng_state, split_tree,
    train_state_of, tree_hash,
)

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
LATEST = "latest"
BEST = "best"
STEP_DIR = re.compile(r"^step-(\d+)$")
_REQUIRED_FILES = (".metadata", "state.json", "extra.json", MANIFEST)


class CheckpointError(RunError):
    """A save that did not commit, or a load that failed after verification; says which rank and why."""


def _rank_failure(rank: int, exc: BaseException) -> str:
    """'rank R: Type: message' (DCP's CheckpointException names its ranks itself)."""
    return failure_text(exc) if isinstance(exc, CheckpointException) else f"rank {rank}: {failure_text(exc)}"


def _distlstm_version() -> str:
    try:
        from importlib.metadata import version

        return version("distlstm")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


# ---------------------------------------------------------------- files, fsync, digests


@contextlib.contextmanager
def quiet_single_process(single: bool) -> Iterator[None]:
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: Path) -> dict:
    size, sha = file_digest(str(path))
    return {"size": size, "sha256": sha}


def _files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def verify_checkpoint(path: Path) -> list[str]:
    """What makes the checkpoint directory ``path`` unusable; an empty list means it is valid."""
    path = Path(path)
    if not path.is_dir():
        return ["directory does not exist"]
    if path.name.endswith(".tmp"):
        return ["leftover .tmp directory: a save that never committed (killed or failed)"]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return [f"{MANIFEST} is missing (the save never committed, or files were removed)"]
    except (OSError, ValueError) as e:
        return [f"{MANIFEST} is unreadable: {e}"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        return [f"{MANIFEST} has an unknown format (want format {FORMAT_VERSION})"]
    files = manifest.get("files", {})
    problems = [f"{MANIFEST} does not list {n}" for n in _REQUIRED_FILES[:-1] if n not in files]
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != manifest.get("step"):
        problems.append(f"{MANIFEST} says step {manifest.get('step')}, directory name says {int(m.group(1))}")
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"file {name} is missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            problems.append(f"file {name} has {size} bytes, manifest says {want['size']} (truncated or rewritten)")
        elif (got := _digest(file)["sha256"]) != want["sha256"]:
            problems.append(f"file {name} sha256 mismatch ({got[:12]}... vs manifest {want['sha256'][:12]}...)")
    if not problems:  # the files are what the manifest says: now whether their content can be trusted
        problems = content_problems(path, manifest)
    return problems


# ---------------------------------------------------------------- the manager


def committed_steps(ckpt_dir: Path) -> dict[int, Path]:
    """Step -> committed checkpoint directory (step-N) under `ckpt_dir`."""
    if not ckpt_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()}


def find_valid(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """The newest valid checkpoint under `ckpt_dir` (the one ``latest`` names first, then step
    directories newest first), and why others were skipped."""
    notes = []
    if not ckpt_dir.is_dir():
        return None, notes
    for p in sorted(ckpt_dir.glob("step-*.tmp")):
        notes.append(f"checkpoint: skipping {p}: leftover .tmp directory from a save that never "
                     "committed (killed or failed); the next save removes it")
    order: list[Path] = []
    try:
        name = (ckpt_dir / LATEST).read_text().strip()
        if STEP_DIR.match(name):
            order.append(ckpt_dir / name)
        else:
            notes.append(f"checkpoint: ignoring pointer {ckpt_dir / LATEST}: content {name[:40]!r} is not a step dir")
    except FileNotFoundError:
        pass
    order += [p for _, p in sorted(committed_steps(ckpt_dir).items(), reverse=True) if p not in order]
    for path in order:
        problems = verify_checkpoint(path)
        if not problems:
            return str(path), notes
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        notes.append(f"checkpoint: skipping {path}: " + "; ".join(problems[:3]) + more)
    return None, notes


class CheckpointManager:
    """Save and load the train state under ``run_dir``; call every method on every rank.

    ``state`` (save and load) is ``{"model": nn.Module (DDP-wrapped or not), "optim": Optimizer |
    None, "extra": dict of components shared by all ranks, "rank_state": this rank's component}``.
    A component is either a checkpointable object (``state_dict()`` / ``load_state_dict()``: the
    manager saves it and, on load, restores it in place) or a plain value (saved as it is and handed
    back in the dict ``load`` returns). ``extra`` components hold JSON values; ``rank_state`` may also
    hold tensors. On load, ``rank_state`` is restored only when the world size is unchanged (a rank's
    RNG state means nothing to another layout); the returned ``rank_state_restored`` says whether it was. With a process group the constructor creates a gloo group for checkpoint
    traffic (a collective: construct it on all ranks, in the same order as other groups).
    """

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, keep_last: int = 3,
                 keep_every: int = 0, async_save: bool = False, log: Callable[[str], Any] = print):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1 (the newest checkpoint is always kept)")
        if keep_every < 0:
            raise ValueError(f"keep_every={keep_every}: must be >= 0 (0 disables it)")
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self._log = log
        self._pg = None
        if dist.is_available() and dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise ValueError(f"CheckpointManager(rank={rank}, world_size={world_size}) but the process group "
                                 f"says rank {dist.get_rank()} of {dist.get_world_size()}")
            # A group of its own: the async writer thread runs DCP collectives on it while the main
            # thread runs DDP all-reduces on the default group; sharing one group would interleave them.
            self._pg = dist.new_group(backend="gloo")
        elif world_size != 1:
            raise ValueError(f"world_size={world_size} but no process group is initialised; "
                             "call torch.distributed.init_process_group first")
        self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="ckpt") if async_save else None
        self._pending: tuple[int, Path, cf.Future] | None = None
        self.best_step: int | None = None
        """checkpoint.keep_best: this step's checkpoint is kept outside keep_last and named by `best`."""
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ---- collectives (always on the checkpoint group, always from the calling thread)

    def _barrier(self) -> None:
        if self._pg is not None:
            dist.barrier(group=self._pg)

    def _broadcast(self, obj: Any) -> Any:
        if self._pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]

    def _gather(self, obj: Any) -> list | None:
        if self._pg is None:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self._pg)
        return out

    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"step-{step:06d}"

    # ---- save

    def save(self, step: int, state: dict) -> Path:
        """Write a checkpoint of ``state`` for ``step``; returns its final directory.

        Sync: returns once committed. Async: returns after the CPU snapshot; the commit happens in
        the next ``save()`` / ``wait()`` / ``close()`` (call one of them on every rank).
        """
        self.wait()
        tmp = self.run_dir / f"step-{step:06d}.tmp"

        def prepare() -> None:
            if self.rank == 0:
                self._remove_stale()
                tmp.mkdir(parents=True)

        # Nobody writes into tmp before rank 0 has cleared what a killed run left there.
        self._all_ok(prepare, f"preparing {tmp}")
        tensors, rest = split_tree(train_state_of(state))
        own = self._all_ok(lambda: self._write_small_files(tmp, state, rest), f"writing small files into {tmp}")
        if self._executor is None:
            future: cf.Future = cf.Future()
            try:
                future.set_result(self._write_shards(tensors, tmp, own))
            # Reported collectively in wait(), so no rank is left waiting. CheckpointException (DCP's
            # failure, e.g. a full disk) derives from BaseException, so `except Exception` misses it.
            except (Exception, CheckpointException) as e:
                future.set_exception(e)
            self._pending = (step, tmp, future)
            self.wait()
        else:
            snapshot = cpu_copy(tensors)
            self._pending = (step, tmp, self._executor.submit(self._write_shards, snapshot, tmp, own))
        return self.step_dir(step)

    def _all_ok(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on every rank; if it fails anywhere, raise everywhere (instead of a hang in the
        next collective on the ranks where it worked)."""
        try:
            result, error = fn(), None
        except (Exception, CheckpointException) as e:
            result, error = e, _rank_failure(self.rank, e)
        errors = [error]
        if self._pg is not None:
            errors = [None] * self.world_size
            dist.all_gather_object(errors, error, group=self._pg)
        if isinstance(result, (CheckpointException, OSError)):  # a full disk, a read-only run directory
            raise CheckpointError(f"checkpoint: {what} failed: {error}; fix: make room in (or make writable) "
                                  f"{self.run_dir}, then start the same command again") from result
        if isinstance(result, Exception):
            raise result
        failed = [e for e in errors if e is not None]
        if failed:
            raise CheckpointError(f"checkpoint: {what} failed on another rank: " + "; ".join(failed))
        return result

    def _write_small_files(self, tmp: Path, state: dict, rest: dict) -> list[str]:
        # Encode on every rank (not only the writer) so a non-JSON value fails on all ranks alike.
        docs = {"state.json": encode_tree(rest, "optimizer/model state"),
                "extra.json": encode_tree(_state_values(state.get("extra")), "state['extra']")}
        name = f"rank-{self.rank:05d}"
        tensors: dict[str, torch.Tensor] = {}
        docs[f"{name}.json"] = encode_tree(_state_values(state.get("rank_state")), "state['rank_state']", tensors)
        if self.rank != 0:
            del docs["state.json"], docs["extra.json"]
        for file, doc in docs.items():
            _write_file(tmp / file, json.dumps(doc).encode())
        torch.save(tensors, tmp / f"{name}.pt")
        _fsync_path(tmp / f"{name}.pt")
        return [*docs, f"{name}.pt"]

    def _write_shards(self, tensors: dict, tmp: Path, own: list[str]) -> dict:
        """DCP write of this rank's shard, then digests of the files this rank wrote (may run in a thread)."""
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        with quiet_single_process(self._pg is None):
            dcp.save(tensors, storage_writer=writer, process_group=self._pg, no_dist=self._pg is None)
        names = own + sorted(p.name for p in tmp.glob(f"__{self.rank}_*.distcp"))
        return {n: _digest(tmp / n) for n in names}

    def wait(self) -> None:
        """Finish and commit an in-flight save (all ranks); raises on all ranks if any rank failed."""
        if self._pending is None:
            return
        step, tmp, future = self._pending
        self._pending = None
        try:
            mine: tuple = ("ok", future.result())
        except (Exception, CheckpointException) as e:
            mine = ("error", _rank_failure(self.rank, e))
        gathered = self._gather(mine)
        verdict = None
        if self.rank == 0:
            errors = [msg for status, msg in gathered if status == "error"]
            if errors:
                verdict = f"checkpoint for step {step} was not committed ({tmp} left for cleanup): " + "; ".join(errors)
            else:
                try:
                    digests = {}
                    for _, d in gathered:
                        digests.update(d)
                    self._commit(step, tmp, digests)
                except Exception as e:
                    verdict = f"checkpoint for step {step} was not committed: {type(e).__name__}: {e}"
        verdict = self._broadcast(verdict)
        if verdict is not None:
            raise CheckpointError(f"{verdict}; fix: make room in (or make writable) {self.run_dir}, then start the "
                                  "same command again: it resumes from the newest committed checkpoint")
        if self.rank == 0:
            try:
                self._apply_retention(step)
            except OSError as e:  # the new checkpoint is committed; a failed delete must not stop training
                self._log(f"checkpoint: retention after step {step} failed ({e}); old checkpoints remain")

    def _commit(self, step: int, tmp: Path, digests: dict) -> None:
        for name in _files_under(tmp):
            _fsync_path(tmp / name)
            if name not in digests:  # DCP's .metadata and anything written by another rank's naming
                digests[name] = _digest(tmp / name)
        manifest = {
            "format": FORMAT_VERSION, "step": step, "world_size": self.world_size,
            "distlstm_version": _distlstm_version(), "torch_version": torch.__version__,
            "time": time.time(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": dict(sorted(digests.items())),
        }
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        _write_file(tmp / MANIFEST, manifest_bytes)
        if (sig := signature(manifest_bytes)) is not None:  # DISTLSTM_CHECKPOINT_KEY is set
            _write_file(tmp / SIGNATURE, sig)
        _fsync_path(tmp)
        final = self.step_dir(step)
        if final.exists():  # same step saved again (resumed from an older checkpoint): set the old aside
            self._retire(final, remove=False)
        os.rename(tmp, final)  # the commit point
        _fsync_path(self.run_dir)
        self._point(LATEST, final)
        if step == self.best_step:
            self._point(BEST, final)
        _fsync_path(self.run_dir)

    def _point(self, name: str, target: Path) -> None:
        """Atomically (re)write the pointer file `name` (latest, best) to the checkpoint `target`."""
        pointer = self.run_dir / f"{name}.tmp"
        _write_file(pointer, f"{target.name}\n".encode())
        os.replace(pointer, self.run_dir / name)

    def mark_best(self, step: int) -> None:
        """checkpoint.keep_best: `step` is the best so far; retention keeps its checkpoint, and `best`
        names it: now if it is already committed (saved at this step before the evaluation; retention
        then drops the previous best), else when its save commits."""
        self.best_step = step
        if self.rank == 0 and self.step_dir(step).is_dir():
            self._point(BEST, self.step_dir(step))
            _fsync_path(self.run_dir)
            try:
                self._apply_retention(step)  # the previous best is no longer protected
            except OSError as e:
                self._log(f"checkpoint: retention after step {step} failed ({e}); old checkpoints remain")

    # ---- retention and cleanup (rank 0 only)

    def _committed(self) -> dict[int, Path]:
        return committed_steps(self.run_dir)

    def _retire(self, path: Path, remove: bool = True) -> None:
        # Rename first: a kill during rmtree then leaves a '.deleting' dir, never a half 'step-N'.
        doomed = path.with_name(path.name + ".deleting")
        if doomed.exists():
            shutil.rmtree(doomed)
        os.rename(path, doomed)
        _fsync_path(self.run_dir)
        if remove:
            shutil.rmtree(doomed, ignore_errors=True)

    def _apply_retention(self, step: int) -> None:
        committed = self._committed()
        older = sorted(s for s in committed if s <= step)
        keep = set(older[-self.keep_last:])
        if self.keep_every > 0:
            keep |= {s for s in older if s % self.keep_every == 0}
        if self.best_step is not None:
            keep.add(self.best_step)
        for s, path in sorted(committed.items()):
            if s > step:
                self._log(f"checkpoint: removing {path}: newer than the step just saved ({step}), "
                          "so it belongs to a run that was resumed from an older checkpoint")
            if s not in keep:
                self._retire(path)
        self._remove_stale()

    def _remove_stale(self) -> None:
        if not self.run_dir.is_dir():
            return
        for p in self.run_dir.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".deleting")):
                shutil.rmtree(p, ignore_errors=True)
        (self.run_dir / f"{LATEST}.tmp").unlink(missing_ok=True)
        (self.run_dir / f"{BEST}.tmp").unlink(missing_ok=True)

    # ---- load

    def load_latest(self, state: dict) -> dict | None:
        """Load the newest valid checkpoint into ``state`` in place; None if there is none."""
        self.wait()
        found = None
        if self.rank == 0:
            found, notes = find_valid(self.run_dir)
            for note in notes:
                self._log(note)
        found = self._broadcast(found)  # one verdict, so every rank loads the same checkpoint
        return None if found is None else self._load_verified(Path(found), state)

    def load(self, path: Path, state: dict) -> dict:
        """Load the checkpoint at ``path`` into ``state``; ValueError if it fails verification."""
        self.wait()
        problems = self._broadcast(verify_checkpoint(Path(path)) if self.rank == 0 else None)
        if problems:
            raise ValueError(f"checkpoint {path} is not valid: " + "; ".join(problems)
                             + "; pick another one (or load_latest, which skips invalid checkpoints)")
        return self._load_verified(Path(path), state)

    def _load_verified(self, path: Path, state: dict) -> dict:
        manifest = json.loads((path / MANIFEST).read_text())
        saved_rest = decode_tree(json.loads((path / "state.json").read_text()))
        if state.get("optim") is not None and "optim" not in saved_rest:
            raise ValueError(f"checkpoint {path} has no optimizer state; load it with state['optim'] = None")
        tensors, _ = split_tree(train_state_of(state))
        # Never DCP's own reader: it unpickles .metadata with pickle.load (see checkpoint_guard).
        check_shapes(path, tensors, SafeFileSystemReader(path).read_metadata())
        try:
            with quiet_single_process(self._pg is None):
                dcp.load(tensors, storage_reader=SafeFileSystemReader(path), process_group=self._pg,
                         no_dist=self._pg is None)
        except CheckpointException as e:  # a BaseException: see save()
            raise CheckpointError(f"checkpoint {path}: loading failed: {failure_text(e)}") from e
        loaded = merge_tree(tensors, saved_rest)
        set_model_state_dict(state["model"], loaded["model"])
        if state.get("optim") is not None:
            set_optimizer_state_dict(state["model"], state["optim"], loaded["optim"])
        rank_state = None
        if self.rank < manifest["world_size"]:
            name = f"rank-{self.rank:05d}"
            try:
                refs = torch.load(path / f"{name}.pt", weights_only=True, map_location="cpu")
            except pickle.UnpicklingError as exc:  # weights_only refused it: not written by distlstm
                raise UnsafeCheckpointError(f"checkpoint {path}: {name}.pt refused by torch.load(weights_only=True): "
                                            f"{str(exc).strip().splitlines()[0]}; use another checkpoint") from None
            rank_state = decode_tree(json.loads((path / f"{name}.json").read_text()), refs)
        extra = decode_tree(json.loads((path / "extra.json").read_text()))
        self._restore_components(path, state.get("extra"), extra)
        restored = False
        if _is_stateful(state.get("rank_state")) and rank_state is not None and manifest["world_size"] == self.world_size:
            state["rank_state"].load_state_dict(rank_state)
            restored = True
        if self.rank == 0:
            self._log(f"checkpoint: loaded {path} (step {manifest['step']}, saved by {manifest['world_size']} "
                      f"rank(s), loading on {self.world_size})")
        return {"step": manifest["step"], "extra": extra, "rank_state": rank_state,
                "rank_state_restored": restored, "world_size": manifest["world_size"], "path": path}

    def _restore_components(self, path: Path, components: dict | None, saved: Any) -> None:
        """`load_state_dict` on every checkpointable component of ``state['extra']``, in order."""
        for key, component in (components or {}).items():
            if not _is_stateful(component):
                continue
            if not isinstance(saved, dict) or key not in saved or saved[key] is None:
                if self.rank == 0:
                    self._log(f"checkpoint: {path} has no state for '{key}'; it starts fresh")
                continue
            component.load_state_dict(saved[key])

    def close(self) -> None:
        """Commit any in-flight async save and stop the writer thread (call on every rank)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._executor is not None:
            # Leaving on an error: other ranks may be gone, so a commit (collectives) could hang.
            # An in-flight save stays a '.tmp' directory that the next run's first save removes.
            self._executor.shutdown(wait=False)
            self._executor = None


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _state_values(obj: Any) -> Any:
    """What goes into the file for ``state['extra']`` / ``state['rank_state']``: each checkpointable
    component's ``state_dict()``, other values as they are (nothing at all: an empty dict)."""
    if obj is None:
        return {}
    if _is_stateful(obj):
        return obj.state_dict()
    if isinstance(obj, dict):
        return {k: v.state_dict() if _is_stateful(v) else v for k, v in obj.items()}
    return obj


def check_shapes(path: Path, target: dict, metadata: Any) -> None:
    """ValueError listing every tensor whose saved shape differs; prunes optimizer state never saved."""
    saved = {k: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    # A parameter that never got a gradient has no optimizer state in the checkpoint: leave it empty.
    for fqn, entry in list(target.get("optim", {}).get("state", {}).items()):
        if not any(f"optim.state.{fqn}.{k}" in saved for k in flatten_tree(entry)):
            del target["optim"]["state"][fqn]
    flat = flatten_tree(target)
    problems = []
    for key, t in flat.items():
        if key not in saved:
            problems.append(f"{key}: missing in checkpoint, expected {list(t.shape)}")
        elif saved[key] != tuple(t.shape):
            problems.append(f"{key}: saved {list(saved[key])}, expected {list(t.shape)}")
    problems += [f"{key}: saved {list(shape)}, not in the model" for key, shape in saved.items()
                 if key.startswith("model.") and key not in flat]
    if problems:
        shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
        raise ValueError(f"checkpoint {path} does not fit the model/optimizer being loaded "
                         f"({len(problems)} mismatched tensor(s)):\n  {shown}\n"
                         "build the model with the config the checkpoint was saved with, or use a fresh run_dir")
