"""Official DeepSeek-V4 Hugging Face checkpoints: what they hold, and strict, memory-mapped load and save.

The model's ``state_dict()`` uses exactly the checkpoint's tensor names, shapes and dtypes (FP8 weights with
their e8m0 ``.scale``, int8-packed FP4 experts, bf16 norms...), so loading is a dtype-preserving copy into
the model's own tensors and saving writes them back unchanged: the round trip is bitwise by construction.
Nothing is converted here; dequantisation is the model's business.

The real checkpoints are 160 GB (Flash) to 865 GB (Pro), larger than the RAM of most hosts, so the loader
never reads a shard whole: it memory-maps the shards and copies tensor by tensor, one layer at a time.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dsv4.config import FP4_BLOCK, QUANT_BLOCK, ModelConfig, overlapping
from dsv4.model.parallel import WHOLE, Shard

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# What HF's own sharding defaults to: large enough for few files, small enough to upload and mmap comfortably.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

TensorSpec = tuple[tuple[int, ...], torch.dtype]

# safetensors header dtype names <-> torch dtypes (only those a V4 checkpoint or a model state can hold).
_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
_LIST_LIMIT = 20  # names shown per problem kind before "... and N more"


class CheckpointError(ValueError):
    """A checkpoint does not match what the model expects; the message lists every offending tensor."""


# ---------------------------------------------------------------------------------------------- layout
def _linear(out: dict[str, TensorSpec], name: str, rows: int, cols: int, fmt: str) -> None:
    """A Linear ``rows x cols`` stored as ``fmt``: fp8 = e4m3 + 128x128 e8m0 block scales, fp4 = two e2m1
    per int8 byte + 1x32 e8m0 scales, bf16 = plain, no scale."""
    if fmt == "fp8":
        out[f"{name}.weight"] = ((rows, cols), torch.float8_e4m3fn)
        out[f"{name}.scale"] = (
            (math.ceil(rows / QUANT_BLOCK), math.ceil(cols / QUANT_BLOCK)),
            torch.float8_e8m0fnu,
        )
    elif fmt == "fp4":
        out[f"{name}.weight"] = ((rows, cols // 2), torch.int8)
        out[f"{name}.scale"] = ((rows, cols // FP4_BLOCK), torch.float8_e8m0fnu)
    elif fmt == "bf16":
        out[f"{name}.weight"] = ((rows, cols), torch.bfloat16)
    else:
        raise ValueError(f"unknown weight format {fmt!r}")


def _compressor(out: dict[str, TensorSpec], name: str, ratio: int, width: int, dim: int) -> None:
    # Ratio 4 pools overlapping windows, so every token carries two halves of features (coff = 2).
    coff = 2 if overlapping(ratio) else 1
    out[f"{name}.wkv.weight"] = ((coff * width, dim), torch.bfloat16)
    out[f"{name}.wgate.weight"] = ((coff * width, dim), torch.bfloat16)
    out[f"{name}.ape"] = ((ratio, coff * width), torch.float32)
    out[f"{name}.norm.weight"] = ((width,), torch.bfloat16)


def _hc(out: dict[str, TensorSpec], name: str, c: ModelConfig) -> None:
    # pre (hc) + post (hc) + the hc x hc mixing matrix, projected from the flattened hc*dim streams.
    mix = (2 + c.hc_mult) * c.hc_mult
    out[f"{name}_fn"] = ((mix, c.hc_mult * c.dim), torch.float32)
    out[f"{name}_base"] = ((mix,), torch.float32)
    out[f"{name}_scale"] = ((3,), torch.float32)


def _hc_head(out: dict[str, TensorSpec], prefix: str, c: ModelConfig) -> None:
    out[f"{prefix}hc_head_fn"] = ((c.hc_mult, c.hc_mult * c.dim), torch.float32)
    out[f"{prefix}hc_head_base"] = ((c.hc_mult,), torch.float32)
    out[f"{prefix}hc_head_scale"] = ((1,), torch.float32)


def _block(out: dict[str, TensorSpec], p: str, c: ModelConfig, index: int) -> None:
    spec = c.layer(index)
    wfmt = c.weight_dtype
    d, hd = c.dim, c.head_dim
    _hc(out, f"{p}hc_attn", c)
    _hc(out, f"{p}hc_ffn", c)
    out[f"{p}attn_norm.weight"] = ((d,), torch.bfloat16)
    out[f"{p}ffn_norm.weight"] = ((d,), torch.bfloat16)

    a = f"{p}attn."
    out[f"{a}attn_sink"] = ((c.n_heads,), torch.float32)
    _linear(out, f"{a}wq_a", c.q_lora_rank, d, wfmt)
    out[f"{a}q_norm.weight"] = ((c.q_lora_rank,), torch.bfloat16)
    _linear(out, f"{a}wq_b", c.n_heads * hd, c.q_lora_rank, wfmt)
    _linear(out, f"{a}wkv", hd, d, wfmt)
    out[f"{a}kv_norm.weight"] = ((hd,), torch.bfloat16)
    _linear(out, f"{a}wo_a", c.o_groups * c.o_lora_rank, c.n_heads * hd // c.o_groups, wfmt)
    _linear(out, f"{a}wo_b", d, c.o_groups * c.o_lora_rank, wfmt)
    if spec.compress_ratio:
        _compressor(out, f"{a}compressor", spec.compress_ratio, hd, d)
    if spec.compress_ratio == 4:
        _linear(out, f"{a}indexer.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank, wfmt)
        out[f"{a}indexer.weights_proj.weight"] = ((c.index_n_heads, d), torch.bfloat16)
        _compressor(out, f"{a}indexer.compressor", 4, c.index_head_dim, d)

    f = f"{p}ffn."
    out[f"{f}gate.weight"] = ((c.n_routed_experts, d), torch.bfloat16)
    if spec.hash_routed:
        out[f"{f}gate.tid2eid"] = ((c.vocab_size, c.n_activated_experts), torch.int64)
    else:
        out[f"{f}gate.bias"] = ((c.n_routed_experts,), torch.float32)
    for w, (rows, cols) in _ffn_shapes(c).items():
        _linear(out, f"{f}shared_experts.{w}", rows, cols, wfmt)
    for e in range(c.n_routed_experts):
        for w, (rows, cols) in _ffn_shapes(c).items():
            _linear(out, f"{f}experts.{e}.{w}", rows, cols, c.expert_dtype)


def _ffn_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    return {"w1": (c.moe_inter_dim, c.dim), "w2": (c.dim, c.moe_inter_dim), "w3": (c.moe_inter_dim, c.dim)}


def expected_tensors(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor an official checkpoint of ``config`` holds: name -> (shape, dtype), in layer order.

    Pure metadata (nothing is allocated), so it is cheap for the real presets too. The MTP blocks share the
    main embedding and head, so they have no ``mtp.*emb*`` / ``mtp.*head.weight`` tensors (spec §9.4).
    """
    c = config
    out: dict[str, TensorSpec] = {
        "embed.weight": ((c.vocab_size, c.dim), torch.bfloat16),
        "head.weight": ((c.vocab_size, c.dim), torch.bfloat16),
        "norm.weight": ((c.dim,), torch.bfloat16),
    }
    _hc_head(out, "", c)
    for spec in c.layers:
        _block(out, f"layers.{spec.index}.", c, spec.index)
    for i, spec in enumerate(c.mtp_layers):
        p = f"mtp.{i}."
        _block(out, p, c, spec.index)
        _linear(out, f"{p}e_proj", c.dim, c.dim, c.weight_dtype)
        _linear(out, f"{p}h_proj", c.dim, c.dim, c.weight_dtype)
        for norm in ("enorm", "hnorm", "norm"):
            out[f"{p}{norm}.weight"] = ((c.dim,), torch.bfloat16)
        _hc_head(out, p, c)
    return out


def layer_group(name: str) -> str:
    """The unit a tensor is loaded with: ``layers.{i}``, ``mtp.{i}`` or ``""`` for the top-level tensors."""
    m = re.match(r"(layers|mtp)\.(\d+)\.", name)
    return m.group(0)[:-1] if m else ""


def _group_order(group: str) -> tuple[int, int]:
    """Top level first, then the main layers numerically (not ``layers.10`` before ``layers.2``), then MTP."""
    if not group:
        return (0, 0)
    kind, i = group.split(".")
    return (1 if kind == "layers" else 2, int(i))


def _name_order(name: str) -> tuple[tuple[int, int], str]:
    return (_group_order(layer_group(name)), name)


# ---------------------------------------------------------------------------------------------- reading
def _shard_files(path: Path) -> tuple[dict[str, Path], list[str]]:
    """name -> shard file from the index (or from the single file), plus problems found on the way."""
    if path.is_file():
        return {k: path for k in _header(path)}, []
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path}: shard file(s) named in {INDEX_NAME} do not exist: {_short(missing)}")
        return {k: path / f for k, f in weight_map.items()}, []
    files = [path / SINGLE_NAME] if (path / SINGLE_NAME).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files")
    where: dict[str, Path] = {}
    problems = []
    for f in files:
        for k in _header(f):
            if k in where:
                problems.append(f"{k}: in both {where[k].name} and {f.name}")
            where[k] = f
    return where, problems


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) from a shard's header, without reading any tensor data."""
    try:
        with safe_open(file, framework="pt") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from None


def _layout(path: Path) -> tuple[dict[str, Path], dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """(name -> shard file, name -> (shape, dtype name), problems) of a checkpoint, from headers only."""
    where, problems = _shard_files(path)
    headers = {file: _header(file) for file in set(where.values())}
    found = {}
    for name, file in where.items():
        if name in headers[file]:
            found[name] = headers[file][name]
        else:
            problems.append(f"{name}: {INDEX_NAME} places it in {file.name}, which does not hold it")
    return where, found, problems


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name such as ``F8_E4M3``) of everything a checkpoint holds.

    Reads headers only; useful to inspect a checkpoint or compare it with :func:`expected_tensors`.
    """
    _, found, problems = _layout(Path(path))
    if problems:
        raise CheckpointError(f"checkpoint {path} is inconsistent: {_short(problems)}")
    return {k: found[k] for k in sorted(found, key=_name_order)}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors header name of a torch dtype (``torch.float8_e4m3fn`` -> ``F8_E4M3``); a dtype no
    checkpoint holds keeps its torch name, so that it shows up as a dtype mismatch rather than a crash."""
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).removeprefix("torch.")


def _short(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


def _mismatches(
    found: Mapping[str, tuple[tuple[int, ...], str]],
    want: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    have_label: str = "checkpoint",
    want_label: str = "model",
) -> list[str]:
    """Every difference between what a checkpoint (or state) holds and what a model (or config) expects,
    one section per kind."""
    missing = sorted(set(want) - set(found), key=_name_order)
    unexpected = sorted(set(found) - set(want), key=_name_order)
    shapes, dtypes = [], []
    for name in sorted(set(want) & set(found), key=_name_order):
        (fshape, fdtype), (wshape, wdtype) = found[name], want[name]
        if fshape != wshape:
            shapes.append(f"{name} ({have_label} {list(fshape)}, {want_label} {list(wshape)})")
        if _DTYPES.get(fdtype) != wdtype:
            dtypes.append(f"{name} ({have_label} {fdtype}, {want_label} {str(wdtype).removeprefix('torch.')})")
    sections = []
    for label, items in (
        (f"missing from the {have_label}", missing),
        (f"unexpected in the {have_label}", unexpected),
        ("wrong shape", shapes),
        ("wrong dtype", dtypes),
    ):
        if items:
            sections.append(f"{len(items)} {label}: {_short(items)}")
    return sections


def load_checkpoint(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    progress: bool = True,
    owned: Callable[[str], Shard | None] | None = None,
) -> None:
    """Fill ``state`` (the model's ``state_dict()``) in place from the checkpoint at ``path``.

    ``path`` is a directory with ``model.safetensors.index.json`` and its shards, a directory with a single
    ``model.safetensors`` (or shards without an index), or one ``.safetensors`` file. Strict: every tensor
    of ``state`` must be in the checkpoint with the same shape and dtype, and the checkpoint may hold
    nothing else; all differences are checked from the headers first and reported together in one
    :class:`CheckpointError`, before a single byte of weights is read.

    ``owned``: for tensor or expert parallelism, the part of each checkpoint tensor this rank holds
    (``dsv4.model.parallel.tensor_shard``). None for a tensor the rank does not hold at all (another rank's
    routed expert): it is neither required in ``state`` nor read. A :class:`Shard` along one dimension: only
    that slice is read (``safe_open(...).get_slice``, never the whole tensor), and the strict check compares
    the checkpoint's whole tensor with the whole shape the rank's slice implies. ``None`` (the argument)
    means the whole of every tensor.

    Tensors are read one layer at a time from memory-mapped shards and copied straight into ``state``
    (which may live on an accelerator), so peak extra host memory is one tensor.
    """
    path = Path(path)
    where, found, problems = _layout(path)
    part_of = owned or (lambda _name: WHOLE)
    shards = {k: part_of(k) for k in {*found, *state}}
    found = {k: v for k, v in found.items() if shards[k] is not None}
    want, slices = {}, []
    for name, t in state.items():
        shard = shards[name]
        if shard is None:
            continue
        shape = tuple(t.shape)
        if shard.dim is not None:
            if shape[shard.dim] != shard.length:
                slices.append(f"{name} (model {list(shape)}, dim {shard.dim} should hold {shard.length})")
            shape = (*shape[: shard.dim], shard.full, *shape[shard.dim + 1 :])
        want[name] = (shape, t.dtype)
    problems = [f"{len(problems)} index problems: {_short(problems)}"] if problems else []
    if slices:
        problems.append(f"{len(slices)} not the rank's slice: {_short(slices)}")
    problems += _mismatches(found, want)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model:\n  " + "\n  ".join(problems))

    groups: dict[str, list[str]] = defaultdict(list)
    for name in want:
        groups[layer_group(name)].append(name)
    total = sum(state[k].numel() * state[k].element_size() for k in want)
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar,
        torch.no_grad(),
    ):
        for group in sorted(groups, key=_group_order):
            bar.set_postfix_str(group or "embed/head")
            by_file: dict[Path, list[str]] = defaultdict(list)
            for name in groups[group]:
                by_file[where[name]].append(name)
            for file, names in by_file.items():
                with safe_open(file, framework="pt") as f:
                    for name in names:
                        dst, shard = state[name], shards[name]
                        dst.copy_(f.get_tensor(name) if shard.dim is None else f.get_slice(name)[shard.index()])
                        bar.update(dst.numel() * dst.element_size())


def open_checkpoint_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint directory, checked against the tensors it holds.

    Catches a config.json that does not belong to its weights (a wrong layer count, experts converted to
    another dtype) when the model is opened rather than midway through loading it.
    """
    config = ModelConfig.from_file(path)
    problems = _mismatches(checkpoint_tensors(path), expected_tensors(config), want_label="config")
    if problems:
        raise CheckpointError(f"{path}: config.json does not describe its tensors:\n  " + "\n  ".join(problems))
    return config


# ---------------------------------------------------------------------------------------------- writing
def _plan_shards(
    names: list[str], sizes: Mapping[str, int], max_shard_bytes: int | None, n_shards: int | None
) -> list[list[str]]:
    """Cut the layer-ordered tensor list into consecutive shards: at most ``max_shard_bytes`` each (a larger
    tensor gets a shard of its own), or ``n_shards`` of roughly equal size."""
    if n_shards is not None:
        if not 1 <= n_shards <= len(names):
            raise ValueError(f"n_shards must be in 1..{len(names)}, got {n_shards}")
        total = sum(sizes[k] for k in names)
        shards: list[list[str]] = [[] for _ in range(n_shards)]
        done = 0
        for i, name in enumerate(names):
            # Place by the tensor's midpoint, but leave at least one tensor for every remaining shard.
            target = min(int((done + sizes[name] / 2) * n_shards / total), n_shards - 1) if total else 0
            target = max(target, n_shards - (len(names) - i))
            shards[target].append(name)
            done += sizes[name]
        return [s for s in shards if s]
    limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    out: list[list[str]] = [[]]
    used = 0
    for name in names:
        if out[-1] and used + sizes[name] > limit:
            out.append([])
            used = 0
        out[-1].append(name)
        used += sizes[name]
    return out


def save_checkpoint(
    state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    path: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    n_shards: int | None = None,
) -> None:
    """Write ``state`` as an official-format checkpoint: ``model-0000i-of-0000n.safetensors`` shards, the
    index (``metadata.total_size``, ``weight_map``) and ``config.json``.

    Tensors are written as they are (dtype and bits preserved), ordered by layer. ``state`` is first checked
    against :func:`expected_tensors` so that nothing is written that the loader would reject. ``n_shards``,
    when given, overrides ``max_shard_bytes`` with that many roughly equal shards. Weight files of an earlier
    checkpoint in ``path`` that the new index does not name are deleted: transformers would pick a stale
    ``model.safetensors`` over the index.
    """
    problems = _mismatches(
        {k: (tuple(t.shape), dtype_name(t.dtype)) for k, t in state.items()},
        expected_tensors(config),
        "state",
        "config",
    )
    if problems:
        raise CheckpointError("state does not match the config's checkpoint layout:\n  " + "\n  ".join(problems))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(state, key=_name_order)
    sizes = {k: state[k].numel() * state[k].element_size() for k in names}
    shards = _plan_shards(names, sizes, max_shard_bytes, n_shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k].detach().cpu().contiguous() for k in shard}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    for old in [path / SINGLE_NAME, *path.glob("model-*-of-*.safetensors")]:
        if old.is_file() and old.name not in weight_map.values():
            old.unlink()
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (path / CONFIG_NAME).write_text(json.dumps(config.to_hf(), indent=2) + "\n")


def allocate_state(config: ModelConfig, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Uninitialised CPU tensors for :func:`expected_tensors` (or the given subset of its names).

    What a loader fills when there is no model object, e.g. to inspect or re-shard a checkpoint.
    """
    specs = expected_tensors(config)
    return {k: torch.empty(specs[k][0], dtype=specs[k][1]) for k in (names if names is not None else specs)}
