"""``llama-fast generate --checkpoint PATH --prompt TEXT``: text from a trained or imported model.

The command's layer: it loads (checkpoints, imported weights, the tokenizer) and samples
with ``llama_fast.model.sample``, which the trainer uses too. PATH is a llama_fast
checkpoint (or a run directory: its latest checkpoint), or imported LLaMA weights (a
Hugging Face or Meta directory, read by ``llama_fast.convert``). The prompt is run through
the model once to fill the cache; then one token at a time is drawn with temperature and
nucleus (top-p) sampling from a seeded generator.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .model import Llama, sample, stream  # noqa: F401  (stream: the lm-eval model's generate_until)


def load_for_sampling(path: str | Path, backend: str, device, dtype: torch.dtype | None) -> Llama:
    """A llama_fast checkpoint or run directory, else imported LLaMA weights."""
    from .convert import is_run, load_pretrained

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: no such file or directory {str(path)!r}")
    if is_run(path):
        from .train.checkpoint import load_model

        return load_model(path, backend=backend, device=device, dtype=dtype)
    return load_pretrained(str(path), backend=backend, dtype=dtype, device=device).eval()


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
    from .convert import find_tokenizer
    from .tokenizer import Tokenizer

    path = Path(checkpoint)
    model = load_for_sampling(path, backend, device, dtype)
    tokenizer = tokenizer or find_tokenizer(path)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.model in {str(path)!r}; pass --tokenizer PATH")
    tok = Tokenizer(tokenizer)
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
