"""llama-fast eval (loss, perplexity, bits per byte) and the lm-evaluation-harness model, offline.

The harness tests run the local tasks of tests/lm_eval_tasks (a multiple-choice task and a rolling
perplexity task on JSON files beside them) through lm_eval's Python API and its command line, and
compare our model with the harness's own ``hf`` model on the same weights exported by convert.save_hf.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_text import write_corpus

from llama_fast import Llama, LlamaConfig, cli
from llama_fast.convert import save_hf
from llama_fast.data import parse_source, prepare, read_text
from llama_fast.evaluate import evaluate_text
from llama_fast.generate import sample
from llama_fast.tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra llama_fast[eval]")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import PreTrainedTokenizer  # noqa: E402

from llama_fast.lm_eval_model import LlamaFastLM  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [read_text(p) for p in sorted(write_corpus(d / "text", 10).iterdir())]
    return Tokenizer.train(iter(texts), 300, d / "tokenizer.model")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_name("tiny", vocab_size=tok.vocab_size, max_seq_len=64)).eval()


@pytest.fixture(scope="module")
def hf_dir(model, tok, tmp_path_factory):
    """The model as a Hugging Face directory, with our tokenizer.model beside it."""
    d = save_hf(model, None, tmp_path_factory.mktemp("hf") / "tiny")
    shutil.copy(tok.path, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


class SentencePieceForHF(PreTrainedTokenizer):
    """Our SentencePiece model as a transformers tokenizer, so that the harness's hf model reads the
    same token ids as ours (transformers' own conversion of a SentencePiece file needs protobuf)."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, path, **kwargs):
        self.sp = Tokenizer(path).sp
        super().__init__(bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kwargs)

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize()

    def get_vocab(self):
        return {self.sp.IdToPiece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text, **kwargs):
        return self.sp.EncodeAsPieces(text)

    def _convert_token_to_id(self, token):
        return self.sp.PieceToId(token)

    def _convert_id_to_token(self, index):
        return self.sp.IdToPiece(index)

    def convert_tokens_to_string(self, tokens):
        # <s> decodes to "<s>" (the harness asks whether a text starts with it), the rest as SentencePiece does.
        out, run = [], []
        for t in tokens:
            if self.sp.IsControl(self.sp.PieceToId(t)):
                out += [self.sp.DecodePieces(run), t]
                run = []
            else:
                run.append(t)
        return "".join(out + [self.sp.DecodePieces(run)])

    def build_inputs_with_special_tokens(self, ids0, ids1=None):
        return [self.bos_token_id] + ids0 + (ids1 or [])


def _run(lm, task, manager):
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True)
    by_doc = {s["doc_id"]: [r[0] for r in s["resps"]] for s in results["samples"][task]}
    return results["results"][task], [by_doc[i] for i in sorted(by_doc)]


def test_loglikelihoods_equal_the_harness_hf_model_on_the_same_weights(hf_dir, tok, tasks):
    from lm_eval.models.huggingface import HFLM

    hf_tok = SentencePieceForHF(str(tok.path))
    ours = LlamaFastLM(checkpoint=str(hf_dir), batch_size=5)  # through convert.load_pretrained
    # add_bos_token=True: contexts start with <s>, as ours do (the paper's model saw <s> first).
    theirs = HFLM(pretrained=str(hf_dir), tokenizer=hf_tok, add_bos_token=True, dtype="float32", device="cpu",
                  batch_size=3)
    ours_metrics, ours_ll = _run(ours, "llama_fast_mc", tasks)
    hf_metrics, hf_ll = _run(theirs, "llama_fast_mc", tasks)
    assert len(ours_ll) == 12 and sum(len(doc) for doc in ours_ll) == 33
    for a, b in zip(ours_ll, hf_ll):
        assert [greedy for _, greedy in a] == [greedy for _, greedy in b]
        torch.testing.assert_close(torch.tensor([ll for ll, _ in a]), torch.tensor([ll for ll, _ in b]),
                                   rtol=0, atol=1e-4)
    assert {k: ours_metrics[k] for k in ("acc,none", "acc_norm,none")} == {
        k: hf_metrics[k] for k in ("acc,none", "acc_norm,none")}

    # Rolling windows: the text without <s>, the first window conditioned on <s> (hf: add_bos_token=False,
    # else its text starts with a second <s>). The texts reach past the context of 64 tokens.
    theirs = HFLM(pretrained=str(hf_dir), tokenizer=hf_tok, add_bos_token=False, dtype="float32", device="cpu",
                  batch_size=2)
    ours_metrics, ours_ll = _run(ours, "llama_fast_rolling", tasks)
    hf_metrics, hf_ll = _run(theirs, "llama_fast_rolling", tasks)
    docs = [json.loads(line)["text"] for line in (TASKS / "llama_fast_rolling.json").read_text().splitlines()]
    assert max(len(tok.encode(d)) for d in docs) > 3 * 64
    torch.testing.assert_close(torch.tensor(ours_ll), torch.tensor(hf_ll), rtol=0, atol=1e-4)
    assert ours_metrics["bits_per_byte,none"] == pytest.approx(hf_metrics["bits_per_byte,none"], abs=1e-5)


def test_loglikelihood_contexts_start_with_bos(model, tok):
    lm = LlamaFastLM(model=model, tokenizer=tok)
    context, continuation = lm._encode_pair("ka lo", " mi")
    assert context[0] == tok.bos_id and continuation == tok.encode("ka lo mi", bos=False)[len(context) - 1:]
    [(empty, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("", "ka lo"), 0)], disable_tqdm=True)
    ids = torch.tensor([[tok.bos_id] + tok.encode("ka lo", bos=False)])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids)[0][0, :-1].float(), -1)  # (S - 1, vocab)
    by_hand = log_probs.gather(-1, ids[0, 1:, None]).sum()
    assert empty == pytest.approx(float(by_hand), abs=1e-4)  # an empty context is <s> alone


def test_generate_until_greedy_stops_and_samples(model, tok):
    lm = LlamaFastLM(model=model, tokenizer=tok, seed=3)
    context = "ka lo mi"
    prompt = tok.encode(context)
    greedy = tok.decode(sample(model, prompt, 12, temperature=0, eos_id=tok.eos_id, vocab_size=tok.vocab_size))
    assert len(greedy) > 4

    def request(**gen_kwargs):
        return Instance("generate_until", {}, (context, gen_kwargs), 0)

    stop = greedy[2:4]
    out = lm.generate_until([request(until=[], max_gen_toks=12), request(until=[stop], max_gen_toks=12)],
                            disable_tqdm=True)
    assert out[0] == greedy  # the KV-cached greedy continuation
    assert out[1] == greedy[: greedy.find(stop)]  # cut at the first stop sequence

    def sampled(seed):
        drawn = request(until=["\n\n"], max_gen_toks=12, do_sample=True, temperature=2.0)
        return LlamaFastLM(model=model, tokenizer=tok, seed=seed).generate_until([drawn], disable_tqdm=True)[0]

    assert sampled(3) == sampled(3) != sampled(4)
    assert greedy not in (sampled(3), sampled(4))
    with pytest.raises(ValueError, match=r"num_beams"):
        lm.generate_until([request(until=[], num_beams=4)], disable_tqdm=True)


def _stream(tok, texts):
    return [t for text in texts for t in tok.encode(text, bos=True, eos=True)]


@pytest.mark.parametrize("seq_len, batch_size", [(64, 4), (13, 1), (13, 3)])
def test_perplexity_is_exp_of_the_mean_token_loss(model, tok, tmp_path, seq_len, batch_size):
    texts = ["ka lo mi ne = 123\nru ta po\n", "def se(x, y):  # di vu\n    return ga\n", "he zo fi by qu\n" * 6]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    metrics = evaluate_text(model, tok, tmp_path, seq_len=seq_len, batch_size=batch_size)
    # By hand: each window's log-softmax, every token after the first scored once, <s> never.
    stream = torch.tensor(_stream(tok, texts))
    nll, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            window = stream[start : start + seq_len + 1]
            log_probs = torch.log_softmax(model(window[None, :-1])[0][0].double(), -1)  # (S, vocab)
            for i, target in enumerate(window[1:].tolist()):
                if target != tok.bos_id:
                    nll -= float(log_probs[i, target])
                    scored += 1
    assert metrics.tokens == scored == len(stream) - len(texts)
    assert metrics.loss == pytest.approx(nll / scored, rel=1e-5)
    assert metrics.perplexity == pytest.approx(math.exp(nll / scored), rel=1e-5)
    assert metrics.documents == 3 and metrics.seq_len == seq_len


def test_bits_per_byte_on_a_text_of_known_byte_count(model, tok, tmp_path):
    (tmp_path / "text.txt").write_text("añb€\n" * 40, encoding="utf-8")  # 1 + 2 + 1 + 3 + 1 bytes, 40 times
    metrics = evaluate_text(model, tok, tmp_path / "text.txt")
    assert metrics.bytes == 320
    assert metrics.bits_per_byte == pytest.approx(metrics.loss * metrics.tokens / math.log(2) / 320, rel=1e-9)
    assert 0 < metrics.bits_per_byte < 20


def test_a_prepared_directory_scores_its_validation_documents(model, tok, tmp_path):
    corpus = write_corpus(tmp_path / "text", 6, seed=1, lines=4)
    data = prepare([parse_source(str(corpus))], tmp_path / "prep", tokenizer=tok.path, val_fraction=0.34,
                   progress=False)
    from_prepared = evaluate_text(model, tok, data, seq_len=32)
    # The held-out files, found by their text: scoring them as text gives the same figures.
    val = (data / "text.val.bin").read_bytes()
    held_out = [p for p in sorted(corpus.iterdir())
                if bytes(memoryview(torch.tensor(tok.encode(p.read_text(), eos=True), dtype=torch.int16).numpy()))
                in val]
    assert len(held_out) == from_prepared.documents == 2
    from_text = evaluate_text(model, tok, ",".join(map(str, held_out)), seq_len=32)
    assert from_text == from_prepared
    assert from_text.bytes == sum(len(p.read_bytes()) for p in held_out)


def test_the_fused_backend_scores_as_the_reference(model, tok, tmp_path):
    (tmp_path / "text.txt").write_text("ka lo mi ne = 12\nru ta po se\n" * 3)
    fused = Llama(model.config, backend="fused").eval()
    fused.load_state_dict(model.state_dict())
    ours, reference = (evaluate_text(m, tok, tmp_path, seq_len=33, batch_size=2) for m in (fused, model))
    assert ours.tokens == reference.tokens and ours.loss == pytest.approx(reference.loss, rel=1e-5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short training run: its checkpoint is what `llama-fast eval` reads."""
    from llama_fast.train import build_parser
    from llama_fast.train.config import from_args
    from llama_fast.train.trainer import train

    tmp = tmp_path_factory.mktemp("run")
    data = prepare([parse_source(str(write_corpus(tmp / "text", 10)))], tmp / "prep", vocab_size=300, progress=False)
    args = ["--run-dir", str(tmp / "run"), "--data", str(data), "--flavor", "tiny", "--model.vocab_size", "300",
            "--seq-len", "32", "--train.batch_tokens", "128", "--train.micro_batch", "4", "--steps", "2",
            "--log.progress", "false", "--log.sample_tokens", "0"]
    train(from_args(build_parser().parse_args(args)))
    return tmp / "run", data


def test_cli_eval_data_and_tasks(run_dir, capsys):
    run, data = run_dir
    argv = ["eval", "--checkpoint", str(run), "--data", str(data), "--seq-len", "32", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{data}: ") and "tokens" in out[0] and "bytes" in out[0]
    assert out[1].startswith("loss ") and "perplexity" in out[1] and "bits per byte" in out[1]
    assert cli.main(argv + ["--json", "--tasks", "llama_fast_mc", "--include-path", str(TASKS), "--limit", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["perplexity"] == pytest.approx(math.exp(report["data"]["loss"]))
    assert f"{report['data']['loss']:.4f}" in out[1]
    assert 0 <= report["tasks"]["llama_fast_mc"]["acc,none"] <= 1


def test_lm_eval_command_finds_the_model(hf_dir):
    """`lm_eval --model llama_fast`: the harness's own command, through the hook pip installs (and its
    default --device cuda:0 falls back to the CPU here, as its hf model does)."""
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval_bin), "--model", "llama_fast", "--model_args", f"checkpoint={hf_dir}", "--tasks",
           "llama_fast_mc", "--include_path", str(TASKS), "--limit", "3", "--batch_size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "llama_fast_mc" in proc.stdout and "acc" in proc.stdout


def _one_line_error(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llama-fast eval: error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line(hf_dir, tmp_path, capsys, model, tok):
    missing = tmp_path / "nowhere"
    _one_line_error(capsys, ["eval", "--checkpoint", str(missing), "--data", str(tmp_path)], str(missing))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00")
    _one_line_error(capsys, ["eval", "--checkpoint", str(hf_dir), "--data", str(tmp_path)], "--data", "no text")
    (tmp_path / "text.txt").write_text("ka lo mi\n")
    _one_line_error(capsys, ["eval", "--checkpoint", str(hf_dir), "--data", str(tmp_path), "--seq-len", "65"],
                    "--seq-len 65", "max_seq_len 64")
    _one_line_error(capsys, ["eval", "--checkpoint", str(hf_dir), "--tasks", "llama_fast_mc,no_such_task",
                             "--include-path", str(TASKS)], "no_such_task")
    _one_line_error(capsys, ["eval", "--checkpoint", str(hf_dir)], "--data", "--tasks")
    with pytest.raises(ValueError, match=r"max_length=65 is longer than the model's context \(max_seq_len 64\)"):
        LlamaFastLM(model=model, tokenizer=tok, max_length=65)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LlamaFastLM(checkpoint=str(missing))
