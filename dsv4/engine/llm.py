"""The public engine: ``LLM(model).generate(prompts, params)``, token streams, and the
``add_request``/``step``/``abort`` loop a server drives.

A step schedules (``scheduler.py``), runs one flattened forward and samples (``runner.py``), then appends
each sampled token to its sequence (``sequence.py``), which detokenises it, holds back text that may still
become a stop string, and decides whether it has finished. Finished sequences give their cache back in
the same step.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dsv4.cache import layout
from dsv4.cache.disk import SessionStore
from dsv4.cache.pool import KVPool
from dsv4.cache.prefix import PrefixCache, PrefixCacheStats
from dsv4.chat.tokenizer import TOKENIZER_FILE, ChatTokenizer, load_tokenizer
from dsv4.checkpoint import open_checkpoint_config
from dsv4.config import PRESETS_DIR, ModelConfig
from dsv4.device import device_scope, resolve_device
from dsv4.engine.constraint import compiler_for
from dsv4.engine.runner import ModelRunner, warm_up
from dsv4.engine.sampler import SampledToken, Sampler
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.scheduler import Scheduler, SchedulerOutput
from dsv4.engine.sequence import Sequence
from dsv4.engine.tensor_parallel import TensorParallelGroup, WorkerSpec
from dsv4.model.linear import Linear
from dsv4.model.loading import default_numerics, load_model
from dsv4.model.parallel import ParallelContext
from dsv4.model.transformer import Transformer
from dsv4.numerics.modes import Numerics, check_batch_invariance, get_numerics
from dsv4.tiny import TINY_RANDOM, tiny_random_checkpoint

Prompt = str | Seq[int]

# Without num_blocks or kv_cache_bytes, the pool holds max_num_seqs sequences of this many tokens (or of
# the model's whole context if shorter): a default that fits a host, not one that fills an accelerator.
DEFAULT_CACHE_TOKENS_PER_SEQUENCE = 16384
# Prefill chunk: on a CPU, 512-token chunks keep each op's working set in cache (a 16K prefill of the
# benchmark's small config ran at 499 tok/s in 512-token chunks, 384 in 2048-token ones); a GPU engine
# would want larger ones.
DEFAULT_CHUNK_SIZE = 512
# Checkpoint slots per running sequence: an agent session needs about two live ones (the end of its last
# prompt and of its last output), long prompts a few more; the rest is room for sessions that wait.
CHECKPOINT_SLOTS_PER_SEQUENCE = 4
DEFAULT_SESSION_DISK_BYTES = 16 * 2**30
# A prefill progress bar is worth drawing once the prompts take more than this many steps.
PROGRESS_MIN_CHUNKS = 4


@dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float  # time.monotonic() seconds
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int


@dataclass(frozen=True)
class RequestOutput:
    """A request's state after a step: cumulative text and tokens, plus what is new since the last one."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    logprobs: list[SampledToken] | None  # per output token, when the request asked for logprobs
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    stop_reason: str | int | None  # the stop string or stop token that matched
    metrics: RequestMetrics
    logits: torch.Tensor | None = None  # [len(token_ids), vocab], with capture_logits
    num_cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of computed
    num_fast_forward_tokens: int = 0  # output tokens its grammar forced, appended without a step of their own

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class StepFailed(RuntimeError):
    """A step's forward raised: the sequences it computed (``request_ids``) were ended and their cache
    freed; every other request, and the engine, go on."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"the step computing {len(request_ids)} sequence(s) failed: {cause!r}")
        self.request_ids = request_ids


def _output(seq: Sequence) -> RequestOutput:
    delta_ids, delta_text = seq.take_delta()
    return RequestOutput(
        request_id=seq.request_id,
        prompt=seq.prompt,
        prompt_token_ids=seq.prompt_ids,
        text=seq.text,
        token_ids=list(seq.output_ids),
        delta_text=delta_text,
        delta_token_ids=delta_ids,
        logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
        finished=seq.finished,
        finish_reason=seq.finish_reason.value if seq.finish_reason else None,
        stop_reason=seq.stop_reason,
        metrics=RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time, seq.num_preemptions),
        logits=torch.stack(seq.logits) if seq.logits else None,
        num_cached_tokens=seq.num_cached_tokens,
        num_fast_forward_tokens=seq.num_fast_forward,
    )


def _eos_ids(path: Path, config: ModelConfig, tokenizer: ChatTokenizer | None) -> list[int]:
    """EOS as generation_config.json declares it (an id or a list), else config.json's, plus the tokenizer's."""
    ids: set[int] = {config.eos_token_id}
    generation = path / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            ids = set(eos) if isinstance(eos, list) else {eos}
    if tokenizer is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def session_fingerprint(
    path: Path, config: ModelConfig, numerics: Numerics, block_tokens: int, chunk_size: int
) -> dict[str, Any]:
    """What a session file must have been written with to be used: the model's shapes, its weights, the
    numerics (a batch-invariant engine's bits, and its chunk grid, differ from a default one's) and the cache
    layout. Weights are identified by each shard's name, size and a digest of its
    first and last MiB (hashing 160 GB at every start-up is out of the question; any two checkpoints that
    differ differ there, since the header lists every tensor and random or trained data fills the rest)."""
    weights = hashlib.blake2b(digest_size=16)
    for shard in sorted(path.glob("*.safetensors")):
        size = shard.stat().st_size
        with shard.open("rb") as f:
            weights.update(f"{shard.name}:{size}".encode())
            weights.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            weights.update(f.read(2**20))
    mode = numerics.name
    formats = [layout.entry_format(config, mode), layout.window_row_format(config, mode)]
    formats.append(layout.indexer_key_format(config, mode))
    return {
        "config": repr(config),
        "weights": weights.hexdigest(),
        "numerics": mode,
        "batch_invariant_chunks": chunk_size if numerics.batch_invariant else None,
        "block_tokens": block_tokens,
        "formats": repr(formats),
    }


class LLM:
    """An engine over one model: continuous batching, chunked prefill and a paged KV pool.

    ``model`` is a checkpoint directory (config.json, safetensors, tokenizer.json) or a preset name, which
    gives the shapes only: such an engine describes the model but refuses to generate. ``numerics``
    defaults to ``bf16_official`` for FP8 checkpoints and ``fp32_nosim`` for plain ones. The pool has
    ``num_blocks`` blocks of ``block_tokens`` tokens, or as many as fit in ``kv_cache_bytes`` next to the
    ``max_num_seqs`` fixed-size state slots. ``seed`` drives the requests that have no seed of their own.
    ``batch_invariant`` makes each sequence's logits bit-identical whatever it is batched with (padded small
    GEMMs, whole attention blocks, prompt chunks at fixed boundaries); see ``dsv4.numerics.modes``.

    ``prefix_cache`` keeps checkpoints of what requests computed (``dsv4.cache.prefix``), in up to
    ``checkpoint_slots`` state slots of the pool beyond the ``max_num_seqs`` running ones, taken every
    ``checkpoint_interval`` tokens inside long prompts (default: ``layout.checkpoint_interval``); with
    ``session_dir`` they are also written to disk, ``session_disk_bytes`` at most, and survive a restart.
    ``device``: where the weights, the cache and the sampler live (cpu, cuda, cuda:N).
    ``tp``: split the model over this many processes (``dsv4.engine.tensor_parallel``; rank r on the r-th
    device from ``device``); this object stays the whole engine. ``close()`` stops them.
    """

    def __init__(
        self,
        model: str | Path,
        numerics: str | None = None,
        *,
        max_num_seqs: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        block_tokens: int = layout.DEFAULT_BLOCK_TOKENS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        batch_invariant: bool = False,
        progress: bool = True,
        prefix_cache: bool = True,
        checkpoint_slots: int | None = None,
        checkpoint_interval: int | None = None,
        session_dir: str | Path | None = None,
        session_disk_bytes: int = DEFAULT_SESSION_DISK_BYTES,
        device: str | torch.device = "cpu",
        tp: int = 1,
    ):
        self.progress = progress
        self.replicas: TensorParallelGroup | None = None
        self._closed = False
        self.device = resolve_device(device)
        self.model: Transformer | None = None
        self.tokenizer: ChatTokenizer | None = None
        if model == TINY_RANDOM:
            model = tiny_random_checkpoint()
        path = Path(model)
        if isinstance(model, str) and not path.exists() and (PRESETS_DIR / f"{model}.json").exists():
            self.source = f"preset {model!r}"
            self.config = ModelConfig.preset(model)
        elif path.is_dir():
            self.source = str(path)
            self.config = open_checkpoint_config(path)
        else:
            presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json")))
            raise ValueError(f"{model}: not a checkpoint directory, {TINY_RANDOM}, nor a preset ({presets})")
        self.numerics = get_numerics(numerics or default_numerics(self.config)).name
        self.max_model_len = min(
            max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings
        )
        self.pool: KVPool | None = None
        self.scheduler: Scheduler | None = None
        if self.source.startswith("preset"):
            return

        layout.check_block_tokens(block_tokens)
        if session_dir is not None and not prefix_cache:
            raise ValueError("session_dir needs the prefix cache (prefix_cache=True)")
        if checkpoint_slots is None:
            checkpoint_slots = CHECKPOINT_SLOTS_PER_SEQUENCE * max_num_seqs if prefix_cache else 0
        if checkpoint_slots < 0:
            raise ValueError(f"checkpoint_slots must be >= 0, got {checkpoint_slots}")
        slots = max_num_seqs + (checkpoint_slots if prefix_cache else 0)
        if num_blocks is None:
            num_blocks = self._blocks_for(kv_cache_bytes, max_num_seqs, slots, block_tokens)
        numerics = replace(get_numerics(self.numerics), batch_invariant=batch_invariant)
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        parallel = ParallelContext(tp, 0)
        if tp > 1:  # the workers load their shares while this process loads its own
            with torch.device("meta"):  # a split that does not fit the model fails here, before any spawn
                Transformer(self.config, numerics, parallel)
            self.replicas = TensorParallelGroup(tp, self.device)
            threads = torch.get_num_threads()
            self.replicas.send_spec(WorkerSpec(str(path), numerics, num_blocks, block_tokens, slots, threads))
        try:
            self.model = load_model(path, numerics, progress=progress, device=self.device, parallel=parallel)
            if batch_invariant:
                check_batch_invariance(
                    (m.in_features, m.out_features) for m in self.model.modules() if isinstance(m, Linear)
                )
            if (path / TOKENIZER_FILE).is_file():
                self.tokenizer = load_tokenizer(path)
            self.eos_token_ids = _eos_ids(path, self.config, self.tokenizer)
            self.pool = KVPool(
                self.config, self.numerics, num_blocks, block_tokens, max_sequences=slots, device=self.device
            )
            if self.replicas is not None:
                self.replicas.wait_ready(self.pool)
            self.chunk_size = chunk_size
            self.prefix_cache: PrefixCache | None = None
            if prefix_cache:
                disk = None
                if session_dir is not None:
                    fingerprint = session_fingerprint(path, self.config, numerics, block_tokens, chunk_size)
                    disk = SessionStore(session_dir, session_disk_bytes, fingerprint)
                self.prefix_cache = PrefixCache(self.pool, disk)
                if checkpoint_interval is None:
                    step = math.lcm(chunk_size, block_tokens)
                    checkpoint_interval = layout.checkpoint_interval(self.config, self.numerics, step)
            self.checkpoint_interval = checkpoint_interval if prefix_cache else None
            # A batch-invariant engine's prompt chunks are never cut short: leave room for one beside the decodes.
            budget = max_num_batched_tokens or chunk_size + (max_num_seqs if batch_invariant else 0)
            self.scheduler = Scheduler(
                self.pool,
                max_num_seqs,
                budget,
                chunk_size,
                aligned_chunks=batch_invariant,
                prefix_cache=self.prefix_cache,
                checkpoint_interval=self.checkpoint_interval,
            )
            sampler = Sampler(torch.Generator(self.device).manual_seed(seed))
            self.runner = ModelRunner(self.model, sampler, self.replicas)
            self._requests: dict[str, Sequence] = {}
            self._ids = itertools.count()
        except BaseException:
            self.close()
            raise

    def _blocks_for(self, kv_cache_bytes: int | None, max_num_seqs: int, slots: int, block_tokens: int) -> int:
        if kv_cache_bytes is None:
            tokens = min(self.max_model_len, DEFAULT_CACHE_TOKENS_PER_SEQUENCE)
            return max_num_seqs * layout.blocks_for(tokens, block_tokens)
        slot_bytes = slots * layout.state_bytes_per_sequence(self.config, self.numerics).total
        block = layout.block_bytes(self.config, self.numerics, block_tokens).total
        blocks = (kv_cache_bytes - slot_bytes) // block
        if blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} leaves no room for a block ({block} B) next to "
                f"{slots} sequence state slots ({slot_bytes} B; checkpoint slots included)"
            )
        return blocks

    def prefix_stats(self) -> PrefixCacheStats:
        """The prefix cache's counters (zeros without one), with the tokens computed since start-up."""
        computed = self.scheduler.computed_tokens if self.scheduler is not None else 0
        if self.prefix_cache is None:
            return PrefixCacheStats(0, 0, 0, computed, 0)
        return replace(self.prefix_cache.stats(), computed_tokens=computed)

    def warm_up(self) -> None:
        """Compile what the model would otherwise compile on its first decodes (the mHC loop of each decode
        batch size), so that the first requests do not wait for it; ``dsv4 serve`` calls it before it listens."""
        model, _ = self._engine()
        if self.replicas is not None:
            self.replicas.warm_up()
        warm_up(model)

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one process). The engine cannot step after."""
        if self.replicas is not None:
            self.replicas.close()
            self._closed = True

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def _engine(self) -> tuple[Transformer, Scheduler]:
        if self._closed:
            raise ValueError("this engine was closed: its tensor-parallel workers are gone")
        if self.model is None or self.scheduler is None:
            raise ValueError(f"{self.source} has shapes only, no weights: pass a checkpoint directory to generate")
        return self.model, self.scheduler

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.source} has no {TOKENIZER_FILE}: pass prompts as token ids")
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        else:
            ids, text = list(prompt), None
        vocab = self.config.vocab_size
        if not ids:
            raise ValueError("empty prompt")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in a {self.max_model_len}-token context")
        return text, ids

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        forced_token_ids: Seq[int] | None = None,
        capture_logits: bool = False,
    ) -> str:
        """Queue a request and return its id. ``forced_token_ids`` feed these tokens instead of sampled ones
        (teacher forcing); ``capture_logits`` keeps each sampling step's logits row in the outputs."""
        _, scheduler = self._engine()
        params = params or SamplingParams()
        params.validate()
        text, ids = self._prompt_ids(prompt)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        detokenizer = self.tokenizer.incremental_detokenizer() if self.tokenizer is not None else None
        constraint = None
        if params.grammar is not None:
            if self.tokenizer is None or forced_token_ids is not None:
                raise ValueError("a grammar needs the model's tokenizer, and cannot be combined with forced tokens")
            constraint = compiler_for(self.tokenizer, self.config.vocab_size).constraint(params.grammar)
        seq = Sequence(
            request_id,
            ids,
            params,
            self.eos_token_ids,
            self.max_model_len,
            detokenizer=detokenizer,
            prompt=text,
            forced_ids=forced_token_ids,
            capture_logits=capture_logits,
            constraint=constraint,
        )
        scheduler.add(seq)
        self._requests[request_id] = seq
        return request_id

    def abort(self, request_id: str) -> None:
        """Finish a request now and free its cache; unknown or finished ids are ignored."""
        seq = self._requests.pop(request_id, None)
        if seq is not None and self.scheduler is not None:
            self.scheduler.abort(seq)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        """Run one engine step; outputs of the requests that got new tokens or finished in it."""
        return self._step()[0]

    def _step(self) -> tuple[list[RequestOutput], SchedulerOutput]:
        _, scheduler = self._engine()
        with device_scope(self.device):  # the pool's block tables and copies, made by the scheduler
            scheduled = scheduler.schedule()
        try:
            results = self.runner.run(scheduled.chunks)
        except Exception as error:
            if self.replicas is not None:  # the ranks may now wait in different collectives
                raise self.replicas.fail(error) from error
            failed = [chunk.seq for chunk in scheduled.chunks]
            for seq in failed:
                scheduler.fail(seq)
                self._requests.pop(seq.request_id, None)
            raise StepFailed([seq.request_id for seq in failed], error) from error
        for r in results:
            r.chunk.seq.append(r.token, r.logits)
        with device_scope(self.device):
            finished = scheduler.update(scheduled.chunks) + scheduled.finished
        changed = list({id(s): s for s in [*(r.chunk.seq for r in results), *finished]}.values())
        for seq in finished:
            self._requests.pop(seq.request_id, None)
        return [_output(s) for s in changed], scheduled

    # ------------------------------------------------------------------ driving the loop
    def _run(self, seqs: list[Sequence]) -> Iterator[RequestOutput]:
        """Step until ``seqs`` finish, yielding their outputs; a progress bar for long prefills."""
        mine = {id(s) for s in seqs}
        request_ids = {s.request_id for s in seqs}
        prompt_tokens = sum(len(s.prompt_ids) for s in seqs)
        bar = None
        if self.progress and prompt_tokens > PROGRESS_MIN_CHUNKS * self.chunk_size:
            bar = tqdm(total=prompt_tokens, unit="tok", desc="prefill", leave=False)
        try:
            while not all(s.finished for s in seqs):
                outputs, scheduled = self._step()
                if bar is not None:
                    done = sum(
                        min(c.start + c.length, len(c.seq.prompt_ids)) - c.start
                        for c in scheduled.chunks
                        if id(c.seq) in mine and c.start < len(c.seq.prompt_ids)
                    )
                    bar.update(min(done, bar.total - bar.n))
                yield from (o for o in outputs if o.request_id in request_ids)
        finally:
            if bar is not None:
                bar.close()

    def generate(
        self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Complete every prompt (text, or token ids) and return the final outputs in prompt order."""
        self._engine()
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise ValueError(f"{len(batch)} prompts but {len(params)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(batch, params, strict=True)]
        seqs = [self._requests[i] for i in ids]
        try:
            for _ in self._run(seqs):
                pass
        finally:
            for s in seqs:
                if not s.finished:
                    self.abort(s.request_id)
        return [_output(s) for s in seqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request as it progresses (``delta_text`` is safe to show: text that may still be
        part of a stop string is held back). Closing the iterator early aborts the request."""
        request_id = self.add_request(prompt, params)
        seq = self._requests[request_id]
        try:
            yield from self._run([seq])
        finally:
            if not seq.finished:
                self.abort(request_id)
