"""Weights in and out: Hugging Face LLaMA directories, Meta's consolidated checkpoints, our own file.

Three formats, one in-memory form: a ``LlamaConfig`` and a state dict with the parameter
names of ``llama_fast.Llama`` (fused ``attn.wqkv`` = [q; k; v] rows and ``mlp.w_gate_up`` =
[gate; up] rows, half-split RoPE layout).

* Hugging Face: ``config.json`` plus ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json`` (or the older ``pytorch_model.bin`` / its shard index). Transformers already stores q and k in the half-split
  layout, so import only concatenates q/k/v and gate/up; export splits them again.
* Meta: ``params.json`` plus ``consolidated.NN.pth``, one file per model-parallel rank.
  Column-parallel weights (wq, wk, wv, w1, w3, output) are split along dim 0, row-parallel
  ones (wo, w2) along dim 1, the embedding along dim 1 (LLaMA 1 and 2) or dim 0 (LLaMA 3),
  norms are replicated. Meta rotates interleaved pairs (2i, 2i+1) of each head; we rotate
  (i, i + D/2), so the rows of wq and wk are permuted once, here, at load.
* llama_fast: one safetensors file whose metadata holds the LlamaConfig as JSON, or a trained
  run: a checkpoint directory, or a run directory (its latest checkpoint). A Hugging Face export
  of a run carries the run's tokenizer (``tokenizer.json`` and the rest), so ``AutoTokenizer``
  and ``AutoModelForCausalLM`` both load the directory.

Loading never runs pickled code: safetensors, or ``torch.load(weights_only=True)``. Bad
input (missing files, corrupt files, wrong shapes, missing or unexpected tensors, model
variants we do not implement) raises an error that names the file, the tensor, what was
expected and what was found.
"""
from __future__ import annotations

import dataclasses

import json
import os
import re
from pathlib import Path

import torch

from .config import LlamaConfig
from .model import Llama
from .tokenizer import Tokenizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"  # older transformers checkpoints: pickles, read with weights_only=True
HF_BIN_INDEX = "pytorch_model.bin.index.json"
META_PARAMS = "params.json"
META_SHARDS = "consolidated.*.pth"
CONFIG_METADATA_KEY = "llama_fast.config"  # key of the LlamaConfig JSON in a save_weights file

# Rotary inverse frequencies some older transformers versions stored as buffers; recomputed, not loaded.
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_META_IGNORED = {"rope.freqs"}

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 (and fp16, fp32 alike) -> torch.dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


# ----------------------------------------------------------------------------------------------
# Files: JSON, safetensors and .pth, each failure reported with the file's path.


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected {what} here, but there is no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {what} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file; only ``names`` when given."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a safetensors weights file here, but there is no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            absent = sorted(set(names or ()) - stored)
            wanted = sorted(stored) if names is None else [n for n in names if n in stored]
            tensors, metadata = {name: f.get_tensor(name) for name in wanted}, (f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if absent:
        raise ValueError(f"{path}: the shard index places tensors {absent} in this file, but it does not hold them")
    return tensors, metadata


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    """A pickled shard (Meta .pth, transformers .bin): a dict of tensors, loaded with weights_only=True (memory-mapped when the format allows)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused or corrupt pickle), RuntimeError, EOFError, ...
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint (corrupt, truncated, or holding objects other than "
            f"tensors, which weights_only=True refuses to unpickle): {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensor names to tensors, got {type(state).__name__}")
    return state


def _first_names(names: set[str], limit: int = 10) -> str:
    """Sorted names, the first ``limit`` of them spelled out: a wrong prefix can mismatch hundreds."""
    ordered = sorted(names)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"{ordered[:limit]}{more}"


def _check_names(found: set[str], expected: set[str], where: str) -> None:
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensor names do not match the config: missing {_first_names(missing)}, "
            f"unexpected {_first_names(unexpected)}"
        )


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], where: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config expects {tuple(expected)}"
        )


# ----------------------------------------------------------------------------------------------
# Our state dict: names and shapes come from the model itself, built on the meta device.


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of ``Llama(config)`` (with tied embeddings lm_head.weight is embed.weight)."""
    with torch.device("meta"):
        model = Llama(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state(config: LlamaConfig, state: dict[str, torch.Tensor], where: str = "state dict") -> None:
    """Raises ValueError unless ``state`` has exactly the names and shapes of ``Llama(config)``.

    With tied embeddings ``lm_head.weight`` may be left out (it is ``embed.weight``).
    """
    shapes = expected_shapes(config)
    expected = set(shapes)
    if config.tie_embeddings and "lm_head.weight" not in state:
        expected.discard("lm_head.weight")
    _check_names(set(state), expected, where)
    for name in expected:
        _check_shape(name, state[name], shapes[name], where)


def build_model(
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    backend: str = "reference",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> Llama:
    """A ``Llama`` holding ``state``, built on the meta device so no weights are initialised twice.

    ``dtype=None`` keeps the dtype of the checkpoint's embedding.
    """
    check_state(config, state)
    dtype = parse_dtype(dtype) or state["embed.weight"].dtype
    with torch.device("meta"):
        model = Llama(config, backend=backend)
    model.to(dtype).to_empty(device=device)  # (ties the embeddings again and computes the rotary tables)
    if config.tie_embeddings:
        state = {**state, "lm_head.weight": state["embed.weight"]}
    model.load_state_dict(state)
    return model


def _model_state(model_or_state, config: LlamaConfig | None) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    if isinstance(model_or_state, Llama):
        return config or model_or_state.config, model_or_state.state_dict()
    if not isinstance(model_or_state, dict):
        raise TypeError(
            f"model_or_state must be a llama_fast.Llama or a state dict, got {type(model_or_state).__name__}"
        )
    if config is None:
        raise ValueError("config is required when saving a state dict (only a Llama model carries its own)")
    return config, model_or_state


def _config(where: str, **fields) -> LlamaConfig:
    """LlamaConfig(**fields), its validation errors prefixed with the file the fields came from."""
    try:
        return LlamaConfig(**fields)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Hugging Face.


def config_from_hf(hf: dict, where: str = HF_CONFIG) -> LlamaConfig:
    """LlamaConfig from a transformers LlamaConfig dict (config.json), refusing variants we do not run."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type must be 'llama', got {hf['model_type']!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act must be 'silu' (SwiGLU), got {hf['hidden_act']!r}")
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias):
            raise ValueError(f"{where}: {bias}=true is not supported; LLaMA has no biases")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in hf:
            raise ValueError(f"{where}: missing required field {key!r}")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise ValueError(
            f"{where}: head_dim={head_dim} is not hidden_size / num_attention_heads = {dim} / {n_heads}; "
            "only head_dim == hidden_size / num_attention_heads is supported"
        )
    # Newer transformers keep theta and the scaling type in rope_parameters, older ones in
    # rope_theta and rope_scaling ({"type": ...} or {"rope_type": ...}).
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{where}: RoPE scaling {rope_type!r} is not implemented; only plain RoPE (rope_type 'default') is"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return _config(
        where,
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        vocab_size=hf["vocab_size"],
        ffn_hidden=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(config: LlamaConfig, dtype: torch.dtype = torch.float32, tokenizer: Tokenizer | None = None) -> dict:
    """A transformers config.json dict for LlamaForCausalLM (read by transformers 4.45 through 5.x); the
    tokenizer's bos and eos ids when one is given."""
    dtype_name = str(dtype).removeprefix("torch.")
    special = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_hidden,
        "vocab_size": config.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # transformers >= 5
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype_name,  # transformers < 5
        "dtype": dtype_name,  # transformers >= 5
        **special,
    }


def _hf_parts(config: LlamaConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Our name -> the transformers tensors (name, shape) it concatenates along dim 0, in order."""
    d, hd, f, v = config.dim, config.head_dim, config.ffn_hidden, config.vocab_size
    parts = {"embed.weight": [("model.embed_tokens.weight", (v, d))], "norm.weight": [("model.norm.weight", (d,))]}
    if not config.tie_embeddings:
        parts["lm_head.weight"] = [("lm_head.weight", (v, d))]
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        parts[ours + "attn_norm.weight"] = [(hf + "input_layernorm.weight", (d,))]
        parts[ours + "attn.wqkv.weight"] = [
            (hf + "self_attn.q_proj.weight", (config.n_heads * hd, d)),
            (hf + "self_attn.k_proj.weight", (config.n_kv_heads * hd, d)),
            (hf + "self_attn.v_proj.weight", (config.n_kv_heads * hd, d)),
        ]
        parts[ours + "attn.wo.weight"] = [(hf + "self_attn.o_proj.weight", (d, config.n_heads * hd))]
        parts[ours + "mlp_norm.weight"] = [(hf + "post_attention_layernorm.weight", (d,))]
        parts[ours + "mlp.w_gate_up.weight"] = [
            (hf + "mlp.gate_proj.weight", (f, d)),
            (hf + "mlp.up_proj.weight", (f, d)),
        ]
        parts[ours + "mlp.w_down.weight"] = [(hf + "mlp.down_proj.weight", (d, f))]
    return parts


def state_from_hf(
    config: LlamaConfig, hf_state: dict[str, torch.Tensor], where: str = "Hugging Face state dict"
) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers LlamaForCausalLM state dict (names and shapes checked)."""
    parts = _hf_parts(config)
    expected = {name: shape for group in parts.values() for name, shape in group}
    found = {name for name in hf_state if not _HF_IGNORED.fullmatch(name)}
    if config.tie_embeddings:
        found.discard("lm_head.weight")  # an in-memory tied model lists it; the checkpoint need not
    _check_names(found, set(expected), where)
    for name, shape in expected.items():
        _check_shape(name, hf_state[name], shape, where)
    state = {ours: torch.cat([hf_state[name] for name, _ in group]) for ours, group in parts.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def state_to_hf(config: LlamaConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers LlamaForCausalLM state dict from ours; split tensors are views of ours."""
    check_state(config, state)
    hf_state = {}
    for ours, group in _hf_parts(config).items():
        pieces = state[ours].split([shape[0] for _, shape in group])  # dim-0 views: [q, k, v] or [gate, up]
        hf_state.update({name: piece for (name, _), piece in zip(group, pieces)})
    return hf_state


def _read_hf_shards(path: Path, index_name: str, read) -> dict[str, torch.Tensor]:
    """The tensors of the shards that ``index_name`` (a transformers shard index) lists, each file
    read by ``read(file, names)``."""
    index = _read_json(path / index_name, "a shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / index_name}: expected a 'weight_map' object of tensor name -> shard file")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    state = {}
    for file, names in sorted(by_file.items()):
        if not (path / file).is_file():
            raise FileNotFoundError(f"{path / file}: shard listed in {index_name} is missing")
        state.update(read(path / file, names))
    return state


def _read_pth_names(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of a pickled shard (weights_only=True), an error when one is absent."""
    state = _read_pth(path)
    absent = sorted(set(names) - set(state))
    if absent:
        raise ValueError(f"{path}: the shard index places tensors {absent} in this file, but it does not hold them")
    return {name: state[name] for name in names}


def load_hf_state(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from a Hugging Face LLaMA directory.

    Weights are read from safetensors when the directory has them, else from the older
    ``pytorch_model*.bin`` pickles with ``torch.load(weights_only=True)``, which refuses
    anything but tensors and plain containers.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a Hugging Face model directory (config.json + weights)")
    config = config_from_hf(_read_json(path / HF_CONFIG, "a transformers config.json"), str(path / HF_CONFIG))
    if (path / HF_WEIGHTS).is_file():
        hf_state, _ = _read_safetensors(path / HF_WEIGHTS)
    elif (path / HF_INDEX).is_file():
        hf_state = _read_hf_shards(path, HF_INDEX, lambda file, names: _read_safetensors(file, names)[0])
    elif (path / HF_BIN).is_file():
        hf_state = _read_pth(path / HF_BIN)
    elif (path / HF_BIN_INDEX).is_file():
        hf_state = _read_hf_shards(path, HF_BIN_INDEX, _read_pth_names)
    else:
        raise FileNotFoundError(
            f"{path}: expected weights in {HF_WEIGHTS}, shards listed in {HF_INDEX}, {HF_BIN}, "
            f"or shards listed in {HF_BIN_INDEX}; found none of them"
        )
    return config, state_from_hf(config, hf_state, str(path))


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' (10^9), '500MiB' (2^20), '100KB'."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"max_shard_size must be bytes or a size like '5GB' or '500MiB', got {size!r}")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def save_hf(
    model_or_state,
    config: LlamaConfig | None,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Writes a Hugging Face directory that ``LlamaForCausalLM.from_pretrained(path)`` loads.

    With ``tokenizer`` (a SentencePiece .model), ``AutoTokenizer.from_pretrained(path)`` loads it
    too (see ``Tokenizer.save_hf``), and config.json and generation_config.json carry its bos and
    eos ids.

    ``model_or_state``: a ``Llama`` (``config`` may then be None) or our state dict. Tensors
    are written in ``dtype`` (default: as they are), in shards of at most ``max_shard_size``
    bytes (a tensor larger than that gets a shard of its own) with a ``model.safetensors.index.json``;
    a single ``model.safetensors`` when everything fits. Weight files of an earlier save in
    ``path`` are removed first so no stale shard is left behind.
    """
    from safetensors.torch import save_file

    config, state = _model_state(model_or_state, config)
    tok = None if tokenizer is None else Tokenizer(tokenizer)
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer}: its vocabulary ({tok.vocab_size}) does not fit the model's "
                         f"vocab_size ({config.vocab_size})")
    limit = _parse_size(max_shard_size)
    dtype = parse_dtype(dtype) or state["embed.weight"].dtype
    hf_state = state_to_hf(config, state)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in hf_state.items():
        size = tensor.numel() * dtype.itemsize
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / HF_WEIGHTS, path / HF_INDEX, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    n = len(shards)
    files = [HF_WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, names in zip(files, shards):
        # copy=True: the q/k/v and gate/up views share storage, which safetensors refuses to write.
        tensors = {name: hf_state[name].detach().to(device="cpu", dtype=dtype, copy=True) for name in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() for t in hf_state.values()) * dtype.itemsize
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (path / HF_CONFIG).write_text(json.dumps(config_to_hf(config, dtype, tok), indent=2) + "\n")
    if tok is not None:
        tok.save_hf(path, model_max_length=config.max_seq_len)
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Meta (consolidated.NN.pth + params.json).


def config_from_meta(params: dict, where: str = META_PARAMS, vocab_size: int | None = None) -> LlamaConfig:
    """LlamaConfig from Meta's params.json; ``vocab_size`` fills in LLaMA 1's ``vocab_size: -1``."""
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ValueError(f"{where}: missing required field {key!r}")
    if params.get("use_scaled_rope"):
        raise ValueError(f"{where}: use_scaled_rope=true (LLaMA 3.1 RoPE scaling) is not implemented")
    dim, multiple_of = params["dim"], params.get("multiple_of", 256)
    # Meta's FeedForward: 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of.
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ValueError(f"{where}: vocab_size is {vocab!r} and no tok_embeddings.weight to infer it from")
        vocab = vocab_size
    return _config(
        where,
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=vocab,
        ffn_hidden=hidden,
        multiple_of=multiple_of,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_seq_len=params.get("max_seq_len", 2048),
    )


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from Meta's RoPE layout to ours: per head, rows (2i, 2i+1) -> (i, i + D/2)."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    w = w.view(n_heads, head_dim // 2, 2, in_features)  # (H, D/2, pair, in): pair 0 = real, 1 = imaginary
    return w.transpose(1, 2).reshape(out_features, in_features)  # (H, pair, D/2, in) -> (H * D, in)


# Sharding of each Meta tensor across model-parallel ranks: the dim shards are concatenated along.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def _merge_meta_shards(name: str, pieces: list[torch.Tensor], dim: int, paths: list[Path]) -> torch.Tensor:
    if len(pieces) == 1:
        return pieces[0]
    if name.endswith(_COLUMN_PARALLEL):
        return torch.cat(pieces, dim=0)
    if name.endswith(_ROW_PARALLEL):
        return torch.cat(pieces, dim=1)
    if name == "tok_embeddings.weight":
        # LLaMA 1/2 split the embedding dim (ParallelEmbedding), LLaMA 3 the vocabulary.
        return torch.cat(pieces, dim=0 if pieces[0].shape[1] == dim else 1)
    for piece, path in zip(pieces[1:], paths[1:]):  # replicated (norms): every rank holds the same tensor
        if not torch.equal(piece, pieces[0]):
            raise ValueError(f"{path}: replicated tensor {name!r} differs from the one in {paths[0]}")
    return pieces[0]


def _meta_parts(config: LlamaConfig) -> dict[str, list[tuple[str, tuple[int, ...], int | None]]]:
    """Our name -> the merged Meta tensors (name, shape, heads to permute for RoPE or None) it concatenates."""
    d, hd, f, v = config.dim, config.head_dim, config.ffn_hidden, config.vocab_size
    parts = {
        "embed.weight": [("tok_embeddings.weight", (v, d), None)],
        "norm.weight": [("norm.weight", (d,), None)],
        "lm_head.weight": [("output.weight", (v, d), None)],
    }
    for i in range(config.n_layers):
        p = f"layers.{i}."
        parts[p + "attn_norm.weight"] = [(p + "attention_norm.weight", (d,), None)]
        parts[p + "attn.wqkv.weight"] = [
            (p + "attention.wq.weight", (config.n_heads * hd, d), config.n_heads),
            (p + "attention.wk.weight", (config.n_kv_heads * hd, d), config.n_kv_heads),
            (p + "attention.wv.weight", (config.n_kv_heads * hd, d), None),
        ]
        parts[p + "attn.wo.weight"] = [(p + "attention.wo.weight", (d, config.n_heads * hd), None)]
        parts[p + "mlp_norm.weight"] = [(p + "ffn_norm.weight", (d,), None)]
        parts[p + "mlp.w_gate_up.weight"] = [
            (p + "feed_forward.w1.weight", (f, d), None),  # gate
            (p + "feed_forward.w3.weight", (f, d), None),  # up
        ]
        parts[p + "mlp.w_down.weight"] = [(p + "feed_forward.w2.weight", (d, f), None)]
    return parts


def _meta_vocab_size(params: dict, shards: list[dict[str, torch.Tensor]]) -> int | None:
    """The vocabulary size the embedding shards hold (LLaMA 1's params.json says -1)."""
    if "tok_embeddings.weight" not in shards[0] or not isinstance(params.get("dim"), int):
        return None
    pieces = [s["tok_embeddings.weight"] for s in shards]
    if pieces[0].dim() != 2 or pieces[0].shape[1] != params["dim"]:  # split along the embedding dim
        return pieces[0].shape[0]
    return sum(p.shape[0] for p in pieces)


def load_meta_state(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from Meta's params.json + consolidated.NN.pth (shards merged, q/k permuted)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a Meta checkpoint directory (params.json + consolidated.*.pth)")
    params = _read_json(path / META_PARAMS, "Meta's params.json")
    paths = sorted(path.glob(META_SHARDS))
    if not paths:
        raise FileNotFoundError(f"{path}: expected Meta weights {META_SHARDS} beside {META_PARAMS}, found none")
    shards = [_read_pth(p) for p in paths]
    names = set(shards[0]) - _META_IGNORED
    for shard, p in zip(shards[1:], paths[1:]):
        _check_names(set(shard) - _META_IGNORED, names, f"{p} (against {paths[0]})")
    config = config_from_meta(params, str(path / META_PARAMS), vocab_size=_meta_vocab_size(params, shards))
    merged = {n: _merge_meta_shards(n, [s[n] for s in shards], config.dim, paths) for n in sorted(names)}
    where = str(path)

    parts = _meta_parts(config)
    expected = {name: shape for group in parts.values() for name, shape, _ in group}
    _check_names(set(merged), set(expected), where)
    for name, shape in expected.items():
        _check_shape(name, merged[name], shape, where + " (shards merged)")
    state = {}
    for ours, group in parts.items():
        pieces = [merged[name] if heads is None else interleaved_to_half_split(merged[name], heads)
                  for name, _, heads in group]
        state[ours] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return config, state


# ----------------------------------------------------------------------------------------------
# Our own file: safetensors, the LlamaConfig JSON in its metadata.


def save_weights(model_or_state, path: str | os.PathLike, config: LlamaConfig | None = None) -> Path:
    """Writes the weights (and the config, as metadata) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    config, state = _model_state(model_or_state, config)
    check_state(config, state)
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in state.items()
        if not (config.tie_embeddings and name == "lm_head.weight")  # the same tensor as embed.weight
    }
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())})
    os.replace(tmp, path)
    return path


def load_weights_state(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from a file written by ``save_weights``, a checkpoint directory or a run directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        from .train.checkpoint import load_model  # a trained run (this module sits above the trainer)

        if not is_run(path):
            raise ValueError(f"{path}: expected a .safetensors file written by save_weights, a checkpoint directory "
                             "(state.json) or a run directory (checkpoints/step_*); found none of them")
        model = load_model(path)
        return model.config, model.state_dict()
    tensors, metadata = _read_safetensors(path)
    if CONFIG_METADATA_KEY not in metadata:
        raise ValueError(
            f"{path}: no {CONFIG_METADATA_KEY!r} in the safetensors metadata; expected a file written by "
            "llama_fast.convert.save_weights"
        )
    try:
        config = LlamaConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the {CONFIG_METADATA_KEY!r} metadata is not a valid LlamaConfig: {exc}") from exc
    check_state(config, tensors, str(path))
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    return config, tensors


def load_weights(
    path: str | os.PathLike,
    backend: str = "reference",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> Llama:
    """The ``Llama`` saved by ``save_weights``."""
    config, state = load_weights_state(path)
    return build_model(config, state, backend, dtype, device)


# ----------------------------------------------------------------------------------------------
# Any of the three.


def is_run(path: Path) -> bool:
    """A llama_fast checkpoint directory, or a run directory holding checkpoints."""
    return (path / "state.json").is_file() or (path / "checkpoints").is_dir()


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """The tokenizer.model beside weights: in the directory, or in a run's latest checkpoint."""
    from .train.checkpoint import checkpoint_dir, latest_checkpoint

    path = Path(path).expanduser()
    candidates = [path / "tokenizer.model"]
    if path.is_dir() and (latest := latest_checkpoint(checkpoint_dir(path))) is not None:
        candidates.insert(0, latest / "tokenizer.model")
    return next((c for c in candidates if c.is_file()), None)


def detect_format(path: str | os.PathLike) -> str:
    """'hf', 'meta' or 'llama-fast' for a checkpoint path; a clear error when it is none of them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "llama-fast"
    elif is_run(path):
        return "llama-fast"
    elif (path / HF_CONFIG).is_file():
        return "hf"
    elif (path / META_PARAMS).is_file():
        return "meta"
    raise ValueError(
        f"{path}: not a checkpoint we can read; expected a Hugging Face directory ({HF_CONFIG} + weights), "
        f"a Meta directory ({META_PARAMS} + {META_SHARDS}), a .safetensors file written by save_weights, "
        "or a llama_fast checkpoint or run directory"
    )


LOADERS = {"hf": load_hf_state, "meta": load_meta_state, "llama-fast": load_weights_state}


def load_state(path: str | os.PathLike, fmt: str | None = None) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from a checkpoint of format ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(path)
    if fmt not in LOADERS:
        raise ValueError(f"checkpoint format must be one of {sorted(LOADERS)}, got {fmt!r}")
    return LOADERS[fmt](path)


def with_max_seq_len(config: LlamaConfig, max_seq_len: int | None) -> LlamaConfig:
    """config with its context length replaced (None keeps it). Meta's params.json does not record
    one (LLaMA 1 trained at 2048, LLaMA 2 at 4096, LLaMA 3 at 8192), so a Meta import assumes 2048."""
    if max_seq_len is None:
        return config
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    return dataclasses.replace(config, max_seq_len=max_seq_len)


def load_pretrained(
    path: str | os.PathLike,
    backend: str = "reference",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> Llama:
    """A ``Llama`` from a Hugging Face directory, a Meta directory or a save_weights file (detected).

    ``dtype=None`` keeps the checkpoint's dtype; ``max_seq_len`` overrides the context length the
    checkpoint gives (Meta's gives none: 2048 is assumed).
    """
    config, state = load_state(path)
    return build_model(with_max_seq_len(config, max_seq_len), state, backend, dtype, device)


# ----------------------------------------------------------------------------------------------
# llama-fast convert


def _convert(args) -> int:
    tokenizer = args.tokenizer or (find_tokenizer(args.src) if args.dst_format == "hf" else None)
    if tokenizer is not None:
        Tokenizer(tokenizer)  # a bad --tokenizer fails before the weights are read
    config, state = load_state(args.src, args.src_format)
    config = with_max_seq_len(config, args.max_seq_len)
    dtype = parse_dtype(args.dtype)
    if dtype is not None:
        state = {name: t.to(dtype) for name, t in state.items()}
    if args.dst_format == "hf":
        save_hf(state, config, args.dst, max_shard_size=args.max_shard_size, tokenizer=tokenizer)
    else:
        save_weights(state, args.dst, config)
    print(f"wrote {args.dst} ({args.dst_format}, {config.num_params() / 1e6:.1f}M parameters)")
    if args.dst_format == "hf":
        print(f"tokenizer: {tokenizer}" if tokenizer else
              "no tokenizer.model beside the weights: AutoTokenizer cannot load the directory; give --tokenizer PATH")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert weights between Hugging Face, Meta and llama_fast formats",
        description="Convert LLaMA weights: Hugging Face directory / Meta consolidated checkpoint / "
        "llama_fast safetensors file, checkpoint or run directory -> Hugging Face directory (with the tokenizer: "
        "AutoModelForCausalLM and AutoTokenizer load it) / llama_fast safetensors file.",
    )
    parser.add_argument("--from", dest="src_format", required=True, choices=sorted(LOADERS), help="source format")
    parser.add_argument("src", help="source checkpoint (directory; for llama-fast a file, a checkpoint or a run "
                        "directory: its latest checkpoint)")
    parser.add_argument("--to", dest="dst_format", required=True, choices=["hf", "llama-fast"], help="target format")
    parser.add_argument("dst", help="target (directory for hf, .safetensors file for llama-fast)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest Hugging Face shard, e.g. 5GB, 500MiB")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="context length to record (default: the source's; Meta's params.json has none, "
                        "2048 is assumed: give 4096 for LLaMA 2, 8192 for LLaMA 3)")
    parser.add_argument("--tokenizer", help="a SentencePiece .model to write with a Hugging Face export "
                        "(default: the one beside the weights, e.g. the checkpoint's)")
    parser.set_defaults(func=_convert)
