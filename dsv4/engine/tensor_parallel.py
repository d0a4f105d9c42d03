"""Tensor parallelism for the engine: one process schedules, every rank computes.

Rank 0 is the whole engine - scheduler, prefix cache, sessions, sampler, server - holding its share of the
weights (``dsv4.model.parallel``). Ranks 1..N-1 are workers: each holds its share of the weights and a
replica of the KV pool (V4 caches one KV head, so every rank needs the whole cache), and does only what
rank 0 tells it. Before each forward, rank 0 broadcasts a ``StepPlan``: the pool operations it made since
the last one (replayed to keep the replicas identical, ``KVPool.replay``) and the step's flattened batch.
Every rank then runs the same forward; its collectives meet inside the layers, and rank 0 samples.

The plans travel on a gloo group of their own (pickled, CPU), whatever carries the activations (gloo on
CPU, NCCL on GPUs), with a timeout long enough for a server to idle. A worker that fails reports its
traceback through a queue and exits; rank 0 notices at once (a watcher thread on the worker processes)
and raises ``WorkerFailed`` instead of waiting on a peer that will never answer.

Started two ways: ``LLM(tp=N)`` spawns the workers itself, or ``torchrun --nproc-per-node N dsv4 ...`` starts
every rank and ranks > 0 call ``run_worker`` (the CLI does it).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsv4.cache.pool import KVPool, PoolOp
from dsv4.device import device_scope
from dsv4.engine.runner import warm_up
from dsv4.model.batch import Span
from dsv4.model.loading import load_model
from dsv4.model.parallel import ParallelContext
from dsv4.numerics.modes import Numerics

# How long a worker may wait for the next plan: as long as a server may sit idle.
PLAN_TIMEOUT = timedelta(days=365)
# How long a collective inside a forward may wait for a live peer (a dead one fails it at once).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class WorkerFailed(RuntimeError):
    """A tensor-parallel rank died or raised: the ranks are out of step and the engine cannot go on."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its share of the engine: the same weights and an identical pool."""

    checkpoint: str
    numerics: Numerics
    num_blocks: int
    block_tokens: int
    max_sequences: int
    threads: int


@dataclass(frozen=True)
class StepPlan:
    """One forward as every rank runs it: pool operations to replay first, then the flattened batch
    (``spans`` as start, length, first position, state slot)."""

    ops: list[PoolOp]
    tokens: list[int]
    spans: list[tuple[int, int, int, int]]
    logit_rows: list[int]


@dataclass(frozen=True)
class _WarmUp:
    """Compile what the first decodes would (``LLM.warm_up``), on every rank."""


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def default_tp() -> int:
    """The tensor-parallel degree when none is given: torchrun's world size, else one process."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def serve_if_worker(device: str | torch.device) -> bool:
    """Under torchrun, a rank > 0 serves rank 0's plans until it closes the group, then returns True: a
    command started on every rank runs its engine on rank 0 only."""
    if not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return False
    run_worker(device)
    return True


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the CPU, or the r-th GPU counted from the one rank 0 was given."""
    if device.type == "cpu":
        return device
    return torch.device(device.type, (device.index or 0) + rank)


def _init(rank: int, world_size: int, init_method: str, device: torch.device) -> dist.ProcessGroup:
    """Join the default group (the layers' collectives) and return the plan group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    return dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)


def _receive(group: dist.ProcessGroup) -> Any:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class TensorParallelGroup:
    """Rank 0's side: starts (or joins) the workers, sends them the spec and each step's plan, and watches
    them. Use one per process: torch.distributed has one default group."""

    def __init__(self, world_size: int, device: torch.device):
        if dist.is_initialized() and not launched_by_torchrun():
            raise RuntimeError("a tensor-parallel engine is already running in this process; close() it first")
        self.world_size, self.device = world_size, device
        self.pool: KVPool | None = None
        self._failure: str | None = None
        self._closing = False
        self._processes: list[mp.process.BaseProcess] = []
        if launched_by_torchrun():
            if int(os.environ["WORLD_SIZE"]) != world_size or int(os.environ["RANK"]) != 0:
                raise ValueError(
                    f"torchrun started rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}; "
                    f"the engine runs on rank 0 of tp={world_size}"
                )
            self._plans = _init(0, world_size, "env://", device)
            return
        self._rendezvous = tempfile.TemporaryDirectory(prefix="dsv4-tp-")
        init_method = f"file://{Path(self._rendezvous.name) / 'group'}"
        context = mp.get_context("spawn")
        self._errors = context.SimpleQueue()
        for rank in range(1, world_size):
            process = context.Process(
                target=_spawned_worker,
                args=(rank, world_size, init_method, rank_device(device, rank), self._errors),
                name=f"dsv4-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            self._processes.append(process)
        threading.Thread(target=self._watch, name="dsv4-tp-watch", daemon=True).start()
        self._plans = _init(0, world_size, init_method, device)

    # ------------------------------------------------------------------ supervision
    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self._processes}
        ready = wait(list(sentinels))
        if self._closing:
            return
        process = sentinels[ready[0]]
        process.join()
        reasons = []
        while not self._errors.empty():
            rank, trace = self._errors.get()
            reasons.append(f"rank {rank}:\n{trace}")
        self._failure = f"tensor-parallel worker {process.name} exited with code {process.exitcode}" + (
            "\n" + "\n".join(reasons) if reasons else ""
        )
        self.on_failure(self._failure)

    def on_failure(self, message: str) -> None:
        """Called from the watcher thread when a worker dies; the next step raises ``WorkerFailed`` anyway.
        A server replaces it to stop at once (a step may be waiting on the dead rank's collective)."""

    def _check(self) -> None:
        if self._failure is not None:
            raise WorkerFailed(self._failure)

    def _send(self, message: Any) -> None:
        self._check()
        try:
            dist.broadcast_object_list([message], src=0, group=self._plans)
        except RuntimeError as error:
            raise WorkerFailed(self._failure or f"a tensor-parallel worker stopped answering: {error}") from error

    # ------------------------------------------------------------------ the engine's calls
    def send_spec(self, spec: WorkerSpec) -> None:
        """Hand the workers what to load; they load while rank 0 does."""
        self._send(spec)

    def wait_ready(self, pool: KVPool) -> None:
        """Return once every worker has loaded its weights and built its pool (``WorkerFailed`` if one could
        not), and record ``pool``'s allocations from now on, for the workers to replay."""
        try:
            dist.barrier(group=self._plans)
        except RuntimeError as error:
            raise WorkerFailed(self._failure or f"a tensor-parallel worker failed while loading: {error}") from error
        self._check()
        self.pool = pool
        pool.journal = []

    def plan(self, tokens: list[int], spans: list[Span], logit_rows: list[int]) -> None:
        """Send the step about to run; the caller then runs the same forward on rank 0."""
        assert self.pool is not None and self.pool.journal is not None
        ops, self.pool.journal = self.pool.journal, []
        layout = [(s.start, s.length, s.pos0, s.cache.slot) for s in spans]  # type: ignore[attr-defined]
        self._send(StepPlan(ops, tokens, layout, logit_rows))

    def warm_up(self) -> None:
        self._send(_WarmUp())

    def fail(self, error: BaseException) -> WorkerFailed:
        """A forward raised on rank 0: the ranks may be inside different collectives now, so the group is
        done. Returns the error to raise."""
        self._failure = self._failure or f"a tensor-parallel forward failed on rank 0: {error!r}"
        return WorkerFailed(self._failure)

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent). Workers that never became ready, or
        a group that failed, cannot take a polite stop: they are killed."""
        if self._closing:
            return
        self._closing = True
        polite = self._failure is None and self.pool is not None
        if polite:
            with contextlib.suppress(RuntimeError):  # a worker that died since is joined below
                dist.broadcast_object_list([None], src=0, group=self._plans)
        for process in self._processes:
            process.join(timeout=30 if polite else 0)
            if process.is_alive():
                process.kill()
                process.join()
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- workers
def _spawned_worker(rank: int, world_size: int, init_method: str, device: torch.device, errors: Any) -> None:
    try:
        plans = _init(rank, world_size, init_method, device)
        _serve(rank, world_size, device, plans)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1) from None


def run_worker(device: str | torch.device = "cpu") -> None:
    """Rank > 0 under torchrun: serve rank 0's plans until it closes the group."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = rank_device(torch.device(device), int(os.environ.get("LOCAL_RANK", rank)))
    _serve(rank, world_size, local, _init(rank, world_size, "env://", local))


def _serve(rank: int, world_size: int, device: torch.device, plans: dist.ProcessGroup) -> None:
    spec: WorkerSpec = _receive(plans)
    torch.set_num_threads(spec.threads)
    model = load_model(
        spec.checkpoint, spec.numerics, progress=False, device=device, parallel=ParallelContext(world_size, rank)
    )
    pool = KVPool(
        model.config, spec.numerics.name, spec.num_blocks, spec.block_tokens, spec.max_sequences, device=device
    )
    dist.barrier(group=plans)
    while (message := _receive(plans)) is not None:
        if isinstance(message, _WarmUp):
            warm_up(model)
            continue
        with device_scope(device):
            for op in message.ops:
                pool.replay(op)
            spans = [Span(start, n, pos0, pool.sequence(slot)) for start, n, pos0, slot in message.spans]
            tokens = torch.tensor(message.tokens)
            model(tokens, spans, torch.tensor(message.logit_rows, dtype=torch.long))
    dist.destroy_process_group()
