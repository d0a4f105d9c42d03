"""``dsv4 serve``: the engine behind an OpenAI- and Anthropic-compatible HTTP API.

Imports of the engine, torch and the web stack happen when the command runs, so ``dsv4 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
from pathlib import Path
from typing import Any

from dsv4.server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH
from dsv4.tiny import TINY_RANDOM, TINY_RANDOM_CONTEXT

log = logging.getLogger("dsv4.server")
# Exit status of a server ended by the death of a tensor-parallel worker.
WORKER_FAILURE_EXIT = 3


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def prefix_cache_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM keyword arguments of the prefix-cache and session-directory options, checked."""
    if args.session_disk_gb is not None and args.session_disk_gb <= 0:
        raise ValueError(f"--session-disk-gb must be > 0, got {args.session_disk_gb}")
    if args.session_disk_gb is not None and args.session_dir is None:
        raise ValueError("--session-disk-gb needs --session-dir")
    if args.checkpoint_interval is not None and args.checkpoint_interval < 1:
        raise ValueError(f"--checkpoint-interval must be >= 1, got {args.checkpoint_interval}")
    if args.no_prefix_cache and (args.session_dir is not None or args.checkpoint_interval is not None):
        raise ValueError("--session-dir and --checkpoint-interval need the prefix cache (drop --no-prefix-cache)")
    kwargs: dict[str, Any] = {
        "prefix_cache": not args.no_prefix_cache,
        "checkpoint_interval": args.checkpoint_interval,
        "session_dir": args.session_dir,
    }
    if args.session_disk_gb is not None:  # otherwise the engine's default
        kwargs["session_disk_bytes"] = int(args.session_disk_gb * 2**30)
    return kwargs


def add_prefix_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="compute every prompt in full: no reuse of the cache of an earlier prompt or reply it extends",
    )
    p.add_argument(
        "--checkpoint-interval",
        type=int,
        default=None,
        metavar="N",
        help="tokens between the prefix-cache checkpoints taken along a prompt (default: the engine's choice)",
    )
    p.add_argument(
        "--session-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="also keep prefix-cache checkpoints on disk in DIR, so that sessions survive eviction from "
        "memory and restarts (default: memory only)",
    )
    p.add_argument(
        "--session-disk-gb",
        type=float,
        default=None,
        metavar="N",
        help="at most N GiB of checkpoints in --session-dir, least recently used removed first "
        "(default: the engine's choice)",
    )


def model_context(model: str) -> int | None:
    """The context a model's config allows (``max_position_embeddings``), read without loading weights;
    None when ``model`` is neither tiny-random, a preset nor a checkpoint directory (the engine says why)."""
    from dsv4.checkpoint import open_checkpoint_config
    from dsv4.config import PRESETS_DIR, ModelConfig

    if model == TINY_RANDOM:
        return TINY_RANDOM_CONTEXT
    path = Path(model)
    if path.is_dir():
        return open_checkpoint_config(path).max_position_embeddings
    if (PRESETS_DIR / f"{model}.json").exists():
        return ModelConfig.preset(model).max_position_embeddings
    return None


def check_max_model_len(requested: int | None, model: str, allowed: int | None) -> None:
    """``--max-model-len`` may lower the model's context, never raise it: the engine would silently clamp."""
    if requested is None:
        return
    if requested < 2:
        raise ValueError(f"--max-model-len must be >= 2 (one prompt token and one to generate), got {requested}")
    if allowed is not None and requested > allowed:
        raise ValueError(
            f"--max-model-len {requested} is above the context of {model} ({allowed} tokens, its "
            "max_position_embeddings); omit it to serve the full context, or pass a smaller value"
        )


def server_limits(args: argparse.Namespace) -> dict[str, int]:
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if args.max_json_depth < 2:
        raise ValueError(f"--max-json-depth must be >= 2, got {args.max_json_depth}")
    return {"max_body_bytes": args.max_body_bytes, "max_json_depth": args.max_json_depth}


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dsv4.engine.llm import LLM
    from dsv4.engine.tensor_parallel import default_tp, serve_if_worker
    from dsv4.server.app import configure_logging, create_app
    from dsv4.server.engine_client import LLMEngineClient
    from dsv4.server.fault_injection import install_fault_injection
    from dsv4.server.serving import ServerConfig

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    cache_kwargs = prefix_cache_kwargs(args)
    limits = server_limits(args)
    check_max_model_len(args.max_model_len, args.model, model_context(args.model))
    configure_logging(args.log_level)
    if serve_if_worker(args.device):
        return 0
    llm = LLM(
        args.model,
        args.numerics,
        max_num_seqs=args.max_num_seqs,
        kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len,
        seed=args.seed,
        batch_invariant=args.batch_invariant,
        device=args.device,
        tp=args.tp or default_tp(),
        **cache_kwargs,
    )
    if llm.replicas is not None:
        llm.replicas.on_failure = _exit_on_worker_failure
    if llm.model is None:
        raise ValueError(f"{args.model} is a preset with shapes only: serve a checkpoint directory or {TINY_RANDOM}")
    check_max_model_len(args.max_model_len, args.model, llm.config.max_position_embeddings)
    log.info("compiling the model's decode loops (seconds, once per machine: inductor caches them)")
    llm.warm_up()
    install_fault_injection(llm)  # test only, from the environment: see dsv4/server/fault_injection.py
    engine = LLMEngineClient(llm, max_queue=args.max_queue)
    names = tuple(args.served_model_name or [Path(args.model).name or args.model])
    config = ServerConfig(
        model_names=names,
        default_thinking=args.thinking == "on",
        session_dir=args.session_dir,
        strict_tools=args.strict_tools,
        **limits,
    )
    app = create_app(engine, config)
    if not _is_loopback(args.host):
        log.warning("listening on %s: the API has no authentication, anyone who can reach it can use it", args.host)
    log.info(
        "OpenAI base URL http://%s:%d/v1, Anthropic base URL http://%s:%d", args.host, args.port, args.host, args.port
    )
    uvicorn_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    # uvicorn drains on SIGTERM, then re-raises the signal with the handler it found installed; a no-op
    # one lets a graceful shutdown end with status 0 instead of death by signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(uvicorn_config).run()
    finally:
        llm.close()
    return 0


def _exit_on_worker_failure(message: str) -> None:
    """A tensor-parallel worker died: the engine thread may be waiting on its collective for good, so the
    server ends here, with the worker's error, rather than hang or answer with a partial model."""
    log.critical("%s\nthe server stops: a tensor-parallel engine cannot run without all of its ranks", message)
    logging.shutdown()
    os._exit(WORKER_FAILURE_EXIT)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over OpenAI- and Anthropic-compatible HTTP APIs",
        description="Serve a checkpoint at /v1/chat/completions, /v1/completions and /v1/messages, with "
        "/v1/models, /health and Prometheus /metrics. Binds the loopback interface unless --host says otherwise.",
    )
    p.add_argument("--model", default=TINY_RANDOM, help=f"checkpoint directory, or {TINY_RANDOM} (the default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="model names clients may ask for (the first is reported); default: the --model name",
    )
    p.add_argument("--numerics", default=None, help="bf16_official, fp32_sim or fp32_nosim (default: by checkpoint)")
    p.add_argument("--device", default="cpu", help="where the model, its cache and sampling run: cpu, cuda, cuda:N")
    p.add_argument("--tp", type=int, default=None, help="split the model over N processes (default: torchrun's, or 1)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences the engine runs at once")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait beyond those; then 429")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context limit, at most the model's (default: the model's); prompt + max_tokens must fit in it",
    )
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="size the KV pool to this many bytes")
    p.add_argument("--seed", type=int, default=0, help="seed for requests that bring none")
    add_prefix_cache_arguments(p)
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="each request's logits (and seeded tokens) independent of what it is batched with; slower",
    )
    p.add_argument(
        "--thinking",
        choices=("on", "off"),
        default="on",
        help="OpenAI requests that neither switch thinking nor set reasoning_effort think by default",
    )
    p.add_argument(
        "--strict-tools",
        action="store_true",
        help="hold every tool call's arguments to the tool's JSON schema, not only tools with strict: true",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"larger request bodies get 413 before they are read (default: {DEFAULT_MAX_BODY_BYTES} = 32 MiB)",
    )
    p.add_argument(
        "--max-json-depth",
        type=int,
        default=DEFAULT_MAX_JSON_DEPTH,
        metavar="N",
        help=f"request bodies nesting arrays and objects deeper than this get 400 (default: {DEFAULT_MAX_JSON_DEPTH})",
    )
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain requests on SIGTERM")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_serve)
