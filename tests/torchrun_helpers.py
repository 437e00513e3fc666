"""Several gloo processes, launched as torchrun launches them: the tests of DDP, FSDP and sharded
checkpoints run the trainer this way, or a script of their own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun(*args: str, nproc: int = 2, timeout: int = 300, interpret: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc *args`; asserts it exited 0 and shows the end of
    its output otherwise. interpret=False drops TRITON_INTERPRET, so the fused ops take their PyTorch
    forwards (the interpreter would take minutes)."""
    env = {k: v for k, v in os.environ.items() if interpret or k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_script(source: str, tmp_path: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `source` as a script in nproc processes with tmp_path as its one argument (where the
    processes leave what the test then reads), without the Triton interpreter."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return torchrun(str(script), str(tmp_path), nproc=nproc, timeout=timeout, interpret=False)
