"""Held-out evaluation: ``llama-fast eval --checkpoint PATH --data PREPARED_DIR_OR_TEXT [--tasks ...]``.

On text, the loss (mean cross-entropy per predicted token, in nats), the perplexity exp(loss)
and the bits per byte, sum of the token losses / ln 2 / UTF-8 bytes of the text: a figure
that does not depend on the tokenizer, so runs with different vocabularies compare.

The text is read as ``llama-fast prepare`` writes it: every document ``<bos> text <eos>``,
documents concatenated. A prepared directory gives its validation split (the documents
``prepare`` held out); files, directories or globs give all their text. The stream is cut
into windows of ``seq_len + 1`` tokens that overlap by one, so every token but the first
is predicted exactly once, with up to ``seq_len`` tokens of context (as the harness's
rolling log-likelihood does). A ``<bos>`` is never a target: it only ever follows an
``<eos>``, so predicting it says nothing about the text. The ``<eos>`` closing each
document is a target, as in training.

``--tasks`` runs lm-evaluation-harness tasks on the same model (``llama_fast.lm_eval_model``).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .data import expand_paths, read_meta, read_text
from .model import Llama
from .tokenizer import Tokenizer


@dataclass
class TextMetrics:
    loss: float  # nats per predicted token
    perplexity: float
    bits_per_byte: float
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the documents' text
    documents: int
    seq_len: int


def read_documents(data: str | Path, tokenizer: Tokenizer) -> tuple[list[list[int]], int]:
    """(token ids of each document, ``<bos> text <eos>``; bytes of their text) of a prepared
    directory's validation split, or of text files, directories or globs (comma-separated)."""
    path = Path(data)
    if (path / "meta.json").is_file():
        return _prepared_documents(path, tokenizer)
    try:
        files = expand_paths([p for p in str(data).split(",") if p])
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--data: {exc}") from exc
    texts = [t for t in map(read_text, files) if t is not None]
    if not texts:
        raise ValueError(f"--data: no text in {str(data)!r} ({len(files)} file(s), all binary or empty)")
    return tokenizer.encode_batch(texts, bos=True, eos=True), sum(len(t.encode("utf-8")) for t in texts)


def _prepared_documents(path: Path, tokenizer: Tokenizer) -> tuple[list[list[int]], int]:
    meta = read_meta(path)
    if (path / meta["tokenizer"]).read_bytes() != tokenizer.path.read_bytes():
        raise ValueError(
            f"--data: {path} was tokenized with another tokenizer than the model's ({tokenizer.path}); "
            "give the text itself (files, a directory or a glob) instead"
        )
    dtype = np.dtype(meta["dtype"])
    stream = np.concatenate([np.fromfile(path / f"{s['name']}.val.bin", dtype=dtype) for s in meta["sources"]])
    starts = np.flatnonzero(stream == tokenizer.bos_id)
    documents = [piece.tolist() for piece in np.split(stream, starts) if len(piece)]
    if not documents:
        raise ValueError(f"--data: {path} holds no validation text (prepared with --val-fraction 0?)")
    # Bytes of the text the ids stand for: decoding skips <bos> and <eos>.
    return documents, sum(len(tokenizer.decode(d).encode("utf-8")) for d in documents)


@torch.no_grad()
def token_nll(
    model: Llama, stream: torch.Tensor, seq_len: int, batch_size: int = 8, ignore_id: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """(sum of the token losses in nats, number of predicted tokens) of the int64 token ``stream``,
    scored in windows of ``seq_len`` predictions; targets equal to ``ignore_id`` are not scored."""
    from tqdm import tqdm

    if not 1 <= seq_len <= model.config.max_seq_len:
        raise ValueError(f"seq_len must lie in [1, max_seq_len={model.config.max_seq_len}], got {seq_len}")
    device = model.embed.weight.device
    starts = list(range(0, len(stream) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(stream)]  # batched; the shorter last window alone
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in starts[len(full):]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    total, count = 0.0, 0
    bar = tqdm(total=len(starts), unit="window", desc="eval", disable=not progress)
    for batch in batches:
        rows = torch.stack([stream[s : s + seq_len + 1] for s in batch]).to(device)  # (B, <= seq_len + 1)
        targets = rows[:, 1:].clone()  # (B, S)
        if ignore_id is not None:
            targets[targets == ignore_id] = -100
        scored = int((targets != -100).sum())
        if scored:
            with autocast:
                _, loss = model(rows[:, :-1], targets)  # the mean over the scored targets
            total += float(loss) * scored
            count += scored
        bar.update(len(batch))
    bar.close()
    return total, count


def evaluate_text(
    model: Llama, tokenizer: Tokenizer, data: str | Path, seq_len: int | None = None, batch_size: int = 8,
    progress: bool = False,
) -> TextMetrics:
    """Loss, perplexity and bits per byte of ``model`` on ``data`` (see the module's docstring)."""
    seq_len = seq_len or model.config.max_seq_len
    documents, n_bytes = read_documents(data, tokenizer)
    stream = torch.tensor([t for d in documents for t in d], dtype=torch.long)
    nll, tokens = token_nll(model, stream, seq_len, batch_size, ignore_id=tokenizer.bos_id, progress=progress)
    loss = nll / tokens
    return TextMetrics(loss, math.exp(loss), nll / math.log(2) / n_bytes, tokens, n_bytes, len(documents), seq_len)


def _cmd_eval(args) -> int:
    from .generate import load_with_tokenizer, resolve_runtime

    try:
        if args.data is None and not args.tasks:
            raise ValueError("give --data (text to score) or --tasks (lm-evaluation-harness tasks), or both")
        if args.seq_len is not None and args.seq_len < 1:
            raise ValueError(f"--seq-len must be a positive int, got {args.seq_len}")
        device, backend, dtype = resolve_runtime(args.device, args.backend, args.dtype)
        tasks = _tasks(args.tasks, args.include_path) if args.tasks else None
        model, tokenizer = load_with_tokenizer(args.checkpoint, args.tokenizer, backend, device, dtype)
        if args.seq_len is not None and args.seq_len > model.config.max_seq_len:
            raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context (max_seq_len "
                             f"{model.config.max_seq_len})")
        report = {"checkpoint": args.checkpoint}
        if args.data is not None:
            metrics = evaluate_text(model, tokenizer, args.data, args.seq_len, args.batch_size,
                                    progress=not args.no_progress)
            report["data"] = {"path": args.data, **asdict(metrics)}
    except (FileNotFoundError, ValueError) as exc:  # bad input: the message says it all, no traceback
        print(f"llama-fast eval: error: {exc}", file=sys.stderr)
        return 2
    if tasks:
        report["tasks"] = _run_tasks(model, tokenizer, *tasks, args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.data is not None:
        m = metrics
        print(f"{args.data}: {m.documents:,} documents, {m.tokens:,} tokens, {m.bytes:,} bytes "
              f"(windows of {m.seq_len} tokens)")
        print(f"loss {m.loss:.4f}  perplexity {m.perplexity:.3f}  bits per byte {m.bits_per_byte:.4f}")
    return 0


def _tasks(tasks: str, include_path: str | None):
    """(the task names of ``--tasks``, comma-separated, globs allowed, each known to the harness; its TaskManager)."""
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as exc:
        raise ValueError("--tasks needs lm-evaluation-harness: pip install 'llama_fast[eval]'") from exc
    names = [t for t in tasks.split(",") if t]
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; `lm_eval ls tasks` lists the known ones")
    return manager.match_tasks(names), manager


def _run_tasks(model: Llama, tokenizer: Tokenizer, tasks: list[str], manager, args) -> dict:
    import lm_eval
    from lm_eval.utils import make_table

    from .lm_eval_model import LlamaFastLM

    lm = LlamaFastLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.seq_len)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=manager)
    if not args.json:
        print(make_table(results))
    return results["results"]


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="loss, perplexity and bits per byte on held-out text; lm-evaluation-harness tasks"
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a llama_fast checkpoint or run directory, or a Hugging Face / Meta LLaMA directory")
    parser.add_argument("--data", help="a prepared directory (its validation split), or text files, directories "
                        "or globs (comma-separated)")
    parser.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,piqa,arc_easy)")
    parser.add_argument("--include-path", help="a directory of extra task YAMLs for --tasks")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per task (default: the task's)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction when < 1)")
    parser.add_argument("--tokenizer", help="a SentencePiece .model (default: the one beside the weights)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="context per window, and the harness's max_length (default: the model's max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights dtype (auto: as stored; bf16 autocast on GPUs)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_eval)
