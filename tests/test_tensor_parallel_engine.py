"""The engine split over processes (``LLM(tp=N)``, ``dsv4 serve --tp N``): rank 0 schedules, every rank
computes. What one process computes, two must compute too - through batching, chunked prefill and the
prefix cache, whose allocations the workers replay - and a worker that dies must end the engine with its
error, never hang it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from test_server_engine import free_port, serving, wait_for

from dsv4.engine.llm import LLM
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.tensor_parallel import WorkerFailed
from dsv4.engine.vectors import run_vectors_through_engine

# fp32_nosim through two ranks sums the row-parallel partial products in another order than one GEMM
# does: a few fp32 ulps on logits of magnitude ~10, far inside the vector sets' 1e-4 tolerance.
TP_FP32_TOLERANCE = 1e-4


def test_vectors_through_two_ranks_match_one(reference_dir: Path) -> None:
    """The reference prompts, prefilled in one ragged batch then decoded together, through tp=2 and tp=1."""
    one = run_vectors_through_engine(reference_dir, "fp32_nosim", batch=True)
    two = run_vectors_through_engine(reference_dir, "fp32_nosim", batch=True, tp=2)
    for i in one:
        assert (one[i] - two[i]).abs().max() <= TP_FP32_TOLERANCE, f"prompt {i}"
        assert torch.equal(one[i].argmax(-1), two[i].argmax(-1)), f"prompt {i}"


def _agent_turns(llm: LLM) -> list[list[int]]:
    """Two sequences in chunks beside each other, then a second turn that extends the first one's prompt and
    output and must restore them from the prefix cache (forks and frees that the workers replay)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    first = llm.generate(["The quick brown fox jumps over the lazy dog. " * 4, "Tensor parallel " * 9], greedy)
    again = first[0].prompt_token_ids + first[0].token_ids + list(range(300, 340))
    second = llm.generate([again], greedy)[0]
    assert second.num_cached_tokens >= len(first[0].prompt_token_ids)
    return [out.token_ids for out in [*first, second]]


def test_greedy_generations_identical(tiny_checkpoint: Path) -> None:
    kwargs = {"max_num_seqs": 2, "chunk_size": 32, "progress": False}
    with LLM(tiny_checkpoint, "fp32_nosim", **kwargs) as one:
        want = _agent_turns(one)
    with LLM(tiny_checkpoint, "fp32_nosim", tp=2, **kwargs) as two:
        assert _agent_turns(two) == want


def test_a_session_restored_from_disk_on_two_ranks(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """An agent's next turn after a restart: rank 0 loads the checkpoint from the session directory and the
    plan carries its tensors to the worker (an ``import_sequence`` replayed), so only the new tokens are
    computed, and the turn continues as one process would."""
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = [(7 * i) % 1200 + 2 for i in range(150)]
    kwargs = {"max_num_seqs": 2, "chunk_size": 32, "progress": False}
    with LLM(tiny_checkpoint, "fp32_nosim", tp=2, session_dir=tmp_path, **kwargs) as llm:
        out = llm.generate([first], greedy)[0]
    second = first + out.token_ids + list(range(400, 430))
    with LLM(tiny_checkpoint, "fp32_nosim", tp=2, session_dir=tmp_path, **kwargs) as llm:
        warm = llm.generate([second], greedy)[0]
        assert llm.prefix_stats().disk_hits == 1 and warm.num_cached_tokens >= len(first)
    with LLM(tiny_checkpoint, "fp32_nosim", prefix_cache=False, **kwargs) as one:
        assert warm.token_ids == one.generate([second], greedy)[0].token_ids


def test_a_dead_worker_fails_the_engine_with_its_exit(tiny_checkpoint: Path) -> None:
    with LLM(tiny_checkpoint, "fp32_nosim", tp=2, progress=False) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=4)
        llm.generate([[5, 6, 7]], params)
        assert llm.replicas is not None
        worker = llm.replicas._processes[0]
        os.kill(worker.pid, signal.SIGKILL)  # the watcher thread reaps it: joining here too would race it
        wait_for(lambda: llm.replicas is not None and llm.replicas._failure is not None, timeout=30)
        with pytest.raises(WorkerFailed, match="exited with code -9"):
            llm.generate([[5, 6, 7]], params)


def test_tp_that_does_not_divide_the_model_is_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="divisible|split"):
        LLM(tiny_checkpoint, "fp32_nosim", tp=3, progress=False)


def test_serve_tp2_answers_and_ends_when_a_worker_dies(tmp_path: Path) -> None:
    with serving(tmp_path, "--tp", "2") as (server, base, log_path):
        body = {"model": "tiny-random", "prompt": [5, 6, 7, 8], "max_tokens": 8, "ignore_eos": True}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert json.loads(response.text)["usage"]["completion_tokens"] == 8

        find = ["pgrep", "-P", str(server.pid), "-f", "spawn_main"]  # the spawned rank, not the resource tracker
        workers = subprocess.run(find, capture_output=True, text=True).stdout.split()
        assert len(workers) == 1
        os.kill(int(workers[0]), signal.SIGKILL)
        assert server.wait(timeout=60) == 3
        assert "tensor-parallel worker" in log_path.read_text()


def test_torchrun_starts_the_ranks_itself(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m dsv4.cli generate``: rank 1 becomes a worker, rank 0 the engine, and
    the greedy text is one process's."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    generate = ["-m", "dsv4.cli", "generate", "--model", "tiny-random", "--prompt", "Hello", "--quiet"]
    generate += ["--numerics", "fp32_nosim", "--temperature", "0", "--max-tokens", "8"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    two = subprocess.run([*torchrun, *generate], env=env, capture_output=True, text=True, timeout=300)
    one = subprocess.run([sys.executable, *generate], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()
