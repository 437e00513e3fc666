"""benchmarks/tune_attention.py: the tables it sweeps exist in kernels/attention.py, its candidates
obey each kernel's block constraint, and without a GPU it says so and exits with 2."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
tune = pytest.importorskip("tune_attention", reason="benchmarks/tune_attention.py imports triton")


@pytest.mark.parametrize("kernel", sorted(tune.KERNELS))
def test_swept_tables_exist_and_candidates_fit_the_kernel(kernel):
    from llama_fast.kernels import attention

    table_name, fallbacks_name, larger = tune.KERNELS[kernel]
    table = getattr(attention, table_name)
    assert isinstance(getattr(attention, fallbacks_name), list)
    assert set(table) == {8, 9} and all(set(per_dim) == {64, 128, 256} for per_dim in table.values())
    configs = list(tune.candidates(larger))
    assert len(configs) == len(set(configs)) > 10
    for block_m, block_n, warps, stages in configs:
        big, small = (block_m, block_n) if larger == "m" else (block_n, block_m)
        assert big % small == 0, (kernel, block_m, block_n)
    # The tuned entries for head dims 64 and 128 are among the candidates, so a sweep can confirm them.
    for major in table:
        for d in (64, 128):
            assert table[major][d] in configs, (kernel, major, d, table[major][d])


def test_without_a_gpu_it_refuses_clearly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the sweep would run")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_attention.py"), "--dims", "64"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
