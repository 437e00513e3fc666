"""The `llama-fast` command line as a user meets it: one-line errors, exact flags, negative numbers, --help."""
import os
import subprocess
import sys

import pytest

from llama_fast import cli
from llama_fast.train import build_parser


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_fast.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--config", "{dir}/bad.toml"], "--config {dir}/bad.toml: not valid TOML"),
    (["--config", "{dir}/unknown.toml"], "config: unknown key 'modle'"),
    (["--train.max_steps", "ten"], "config train.max_steps: expected int, got 'ten'"),
    (["--flavor", "huge"], "unknown model.flavor 'huge'"),
    (["--data", "{dir}/missing"], "no such file or directory"),
])
def test_a_user_mistake_is_one_line_with_status_2(tmp_path, args, message):
    (tmp_path / "bad.toml").write_text("[train]\nmax_steps = \n")
    (tmp_path / "unknown.toml").write_text("[modle]\nflavor = 'tiny'\n")
    args = [a.format(dir=tmp_path) for a in args]
    done = run_cli("train", "--run-dir", str(tmp_path / "run"), *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-fast train: error: "), done.stderr
    assert message.format(dir=tmp_path) in lines[0]
    # The traceback stays one flag (or one environment variable) away.
    for debug in ([*args, "--debug"], args):
        env = None if "--debug" in debug else {cli.DEBUG_ENV: "1"}
        done = run_cli("train", "--run-dir", str(tmp_path / "run"), *debug, env=env)
        assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr


def test_flags_are_not_abbreviated_and_unknown_ones_get_the_nearest(capsys):
    for typo, nearest in (("--train.max_step", "--train.max_steps"), ("--max-steps", "--train.max_steps"),
                          ("--optim.warmup", "--optim.warmup_steps")):
        with pytest.raises(SystemExit) as exited:
            cli.main(["train", typo, "5"])
        err = capsys.readouterr().err
        assert exited.value.code == 2
        assert err.startswith("usage: llama-fast train "), err  # train's usage, not the top level's
        assert f"unrecognized arguments {typo} 5; did you mean {nearest}?" in err


def test_negative_numbers_are_values(capsys):
    """argparse takes '-1e-3' for a flag ('expected one argument'), though it knows '-1' and '-1.5'."""
    args = cli.build_parser().parse_args(["train", "--lr", "-1e-3", "--optim.warmup_steps", "-1", "--model.rope_theta",
                                          "-2.5E+4", "--seq-len=-3"])
    assert (getattr(args, "optim.lr"), getattr(args, "optim.warmup_steps")) == ("-1e-3", "-1")
    assert (getattr(args, "model.rope_theta"), getattr(args, "data.seq_len")) == ("-2.5E+4", "-3")
    assert cli.main(["train", "--lr", "-1e-3"]) == 2  # parsed, then refused by value, in one line
    assert capsys.readouterr().err.strip() == "llama-fast train: error: optim.lr must be >= 0, got -0.001"


def test_help_says_what_auto_becomes():
    text = build_parser().format_help()
    assert "--optim.lr V" in text and "else 1e-3 below 100M parameters" in " ".join(text.split())
    assert "min(2000, max_steps // 10)" in text
