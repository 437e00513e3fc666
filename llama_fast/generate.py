"""Sampling with the KV cache: ``llama-fast generate --checkpoint PATH --prompt TEXT``.

PATH is a llama_fast checkpoint (or a run directory: its latest checkpoint), or imported
LLaMA weights (a Hugging Face or Meta directory, read by ``llama_fast.convert``). The
prompt is run through the model once to fill the cache; then one token at a time is drawn
with temperature and nucleus (top-p) sampling from a seeded generator.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .model import KVCache, Llama


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B, 1]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)


def sample(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """The new token ids after ``prompt`` (stops early at ``eos_id``).

    ``vocab_size``: draw only ids below it (the tokenizer's vocabulary, when the model's
    embedding is padded beyond it).
    """
    return list(stream(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       eos_id=eos_id, vocab_size=vocab_size))


@torch.no_grad()
def stream(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[int]:
    """``sample``, one new token id at a time: a caller that stops on text (the harness's stop
    sequences) closes the generator and no further forward runs."""
    if not prompt:
        raise ValueError("sample: prompt must hold at least one token id (e.g. bos), got none")
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must lie in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"sample: max_new_tokens must be >= 0, got {max_new_tokens}")
    config = model.config
    if len(prompt) >= config.max_seq_len:
        raise ValueError(
            f"sample: the prompt has {len(prompt)} tokens; the model's max_seq_len {config.max_seq_len} "
            "leaves no room for a new one"
        )
    max_new_tokens = min(max_new_tokens, config.max_seq_len - len(prompt))
    device = model.embed.weight.device
    dtype = torch.bfloat16 if device.type == "cuda" else model.embed.weight.dtype
    cache = KVCache.empty(config, 1, len(prompt) + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens = torch.tensor([prompt], device=device)  # (1, P)
    for _ in range(max_new_tokens):
        with autocast:
            logits, _ = model(tokens, cache=cache)  # (1, S, vocab)
        tokens = next_token(logits[:, -1, :vocab_size], temperature, top_p, generator)  # (1, 1)
        yield int(tokens)
        if eos_id is not None and int(tokens) == eos_id:
            return


def load_for_sampling(path: str | Path, backend: str, device, dtype: torch.dtype | None) -> Llama:
    """A llama_fast checkpoint or run directory, else imported LLaMA weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: no such file or directory {str(path)!r}")
    if (path / "state.json").is_file() or (path / "checkpoints").is_dir():
        from .train.checkpoint import load_model

        return load_model(path, backend=backend, device=device, dtype=dtype)
    from .convert import load_pretrained  # Hugging Face or Meta weights

    return load_pretrained(str(path), backend=backend, dtype=dtype, device=device).eval()


def find_tokenizer(path: Path) -> Path:
    from .train.checkpoint import checkpoint_dir, latest_checkpoint

    candidates = [path / "tokenizer.model"]
    if (latest := latest_checkpoint(checkpoint_dir(path))) is not None:
        candidates.insert(0, latest / "tokenizer.model")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no tokenizer.model in {str(path)!r}; pass --tokenizer PATH")


def resolve_runtime(device: str = "auto", backend: str = "auto", dtype: str = "auto"):
    """(device, backend, weights dtype or None) from the command line's choices: "auto" is the GPU with the
    fused backend where there is one, else the CPU with the reference backend; dtype "auto" (None)
    keeps the weights as stored."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend if backend != "auto" else ("fused" if torch.device(device).type == "cuda" else "reference")
    return device, backend, {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def load_with_tokenizer(checkpoint: str | Path, tokenizer: str | Path | None, backend: str, device, dtype):
    """(model, tokenizer) of a checkpoint, run directory or imported weights; the tokenizer is the one
    beside the weights unless ``tokenizer`` names another, and must fit the model's vocabulary."""
    from .tokenizer import Tokenizer

    path = Path(checkpoint)
    model = load_for_sampling(path, backend, device, dtype)
    tok = Tokenizer(tokenizer or find_tokenizer(path))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer vocabulary ({tok.vocab_size}) does not fit the model's vocab_size ({model.config.vocab_size})"
        )
    return model, tok


def _cmd_generate(args) -> int:
    device, backend, dtype = resolve_runtime(args.device, args.backend, args.dtype)
    model, tok = load_with_tokenizer(args.checkpoint, args.tokenizer, backend, device, dtype)
    prompt = tok.encode(args.prompt, bos=True)
    for i in range(args.num_samples):
        new = sample(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed + i, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tok.decode(prompt[1:] + new))
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="sample text from a checkpoint or imported LLaMA weights")
    parser.add_argument("--checkpoint", required=True,
                        help="a llama_fast checkpoint or run directory, or a Hugging Face / Meta LLaMA directory")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--tokenizer", help="a SentencePiece .model (default: the one beside the weights)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights dtype (auto: as stored for checkpoints; bf16 autocast on GPUs)")
    parser.set_defaults(func=_cmd_generate)
