"""llama_fast in EleutherAI's lm-evaluation-harness: ``lm_eval --model llama_fast --model_args checkpoint=PATH``.

``pip install 'llama_fast[eval]'`` installs the harness. The model is registered as ``llama_fast``
when this module is imported, and ``lm_eval`` finds it without importing it first through the
hook of ``llama_fast_lm_eval_hook`` (lm-eval 0.4.13 has no plugin entry points).

Model arguments (``--model_args k=v,...``): ``checkpoint`` (a llama_fast checkpoint or run
directory, or a Hugging Face / Meta LLaMA directory, loaded as ``llama-fast generate`` does),
``tokenizer`` (default: the tokenizer.model beside the weights), ``backend``, ``device``
(auto, cpu, cuda, cuda:N: as ``llama-fast eval``), ``dtype`` (auto: as stored), ``batch_size``,
``max_length`` (default and upper bound: the model's max_seq_len), ``seed`` (sampling).

Requests, as the paper's model sees text: every context starts with ``<bos>`` (an empty one
is ``<bos>`` alone), as every training document did.

* ``loglikelihood``: the requests sorted longest first and scored ``batch_size`` at a time,
  right-padded (causal attention keeps the padding out of every real position), each
  continuation's tokens read off one forward of context + continuation. A request longer
  than ``max_length + 1`` tokens loses its oldest context tokens, with a warning, as the
  harness's ``hf`` model does.
* ``loglikelihood_rolling``: the text without ``<bos>``, in the harness's rolling windows of
  ``max_length`` predictions, the first conditioned on ``<bos>``; all windows of all requests
  batched together.
* ``generate_until``: one request at a time through the KV cache (``llama_fast.generate.stream``),
  stopping at ``<eos>``, at ``max_gen_toks`` or at the first stop sequence, which is cut off;
  greedy unless ``do_sample`` (then ``temperature`` and ``top_p``).
"""
from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  (the harness's own models: get_model imports them only into an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .convert import parse_dtype
from .generate import load_with_tokenizer, resolve_runtime, stream
from .model import Llama
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


@register_model("llama_fast")
class LlamaFastLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: str | Tokenizer | None = None,
        backend: str = "auto",
        device: str | None = "auto",
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,  # the harness passes it along; batches are batch_size
        max_length: int | None = None,
        seed: int = 0,
        *,
        model: Llama | None = None,
    ):
        """From ``checkpoint``, or from a loaded ``model`` and its ``tokenizer`` (a Tokenizer)."""
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("llama_fast: give checkpoint=PATH in --model_args")
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # lm_eval's command line says cuda:0 unless told otherwise; its hf model falls back too.
                logger.warning("llama_fast: device=%s but CUDA is not available; running on the CPU", device)
                device = "cpu"
            device, backend, _ = resolve_runtime(device or "auto", backend)
            dtype = parse_dtype(None if dtype == "auto" else dtype)
            model, tokenizer = load_with_tokenizer(checkpoint, tokenizer, backend, device, dtype)
        elif not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"llama_fast: a model needs its Tokenizer, got tokenizer={tokenizer!r}")
        self.model, self.tok = model.eval(), tokenizer
        context = model.config.max_seq_len
        self._max_length = context if max_length is None else int(max_length)
        if not 1 <= self._max_length <= context:
            raise ValueError(f"llama_fast: max_length={max_length} is longer than the model's context "
                             f"(max_seq_len {context})")
        # 'auto' (the harness's adaptive batch size) is not implemented: the default size instead.
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.seed = int(seed)
        self._warned_truncation = False

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) -> log-probabilities (B, S, vocab) in fp32."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            logits, _ = self.model(tokens.to(self.device))  # (B, S, vocab)
        return torch.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: (cache key or None, context ids, continuation ids) -> (log-likelihood, greedy?)."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="llama_fast loglikelihood")
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            inputs = [self._input_ids(*requests[i][1:]) for i in batch]
            tokens = torch.zeros(len(batch), len(inputs[0]), dtype=torch.long)  # (B, longest); 0 pads
            for row, ids in enumerate(inputs):
                tokens[row, : len(ids)] = torch.tensor(ids)
            log_probs = self._log_probs(tokens)  # (B, S, vocab)
            for row, i in enumerate(batch):
                key, _, continuation = requests[i]
                end = len(inputs[row])
                lp = log_probs[row, end - len(continuation) : end]  # (C, vocab): the continuation's predictions
                target = torch.tensor(continuation, device=lp.device)
                results[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
            bar.update(len(batch))
        bar.close()
        return results

    def _input_ids(self, context: list[int], continuation: list[int]) -> list[int]:
        """The tokens of one forward: context + continuation less its last, the oldest dropped beyond max_length."""
        if not context or not continuation:
            raise ValueError(f"llama_fast: a request needs context and continuation tokens, got {len(context)} and "
                             f"{len(continuation)}")
        whole = context + continuation
        if len(whole) > self.max_length + 1 and not self._warned_truncation:
            logger.warning("llama_fast: requests longer than max_length=%d + 1 tokens (first: %d) lose their oldest "
                           "context tokens", self.max_length, len(whole))
            self._warned_truncation = True
        return whole[-(self.max_length + 1) :][:-1]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok.encode(text, bos=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (log_likelihood, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += log_likelihood
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for n, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="llama_fast generate_until")):
            context, gen_kwargs = req.args
            text = self._generate(context, dict(gen_kwargs or {}), seed=self.seed + n)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _generate(self, context: str, gen_kwargs: dict, seed: int) -> str:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"llama_fast: generation arguments {unknown} are not supported; known: {list(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample") else 0.0
        prompt = self.tok.encode(context, bos=True)[-max(1, self.max_length - max_new) :]
        new: list[int] = []
        text = ""
        for token in stream(self.model, prompt, max_new, temperature=temperature, top_p=float(gen_kwargs.get(
                "top_p", 1.0)), seed=seed, eos_id=self.tok.eos_id, vocab_size=self.tok.vocab_size):
            new.append(token)
            text = self.tok.decode(new)
            stops = [text.find(s) for s in until if s and s in text]
            if stops:
                return text[: min(stops)]
        return text
