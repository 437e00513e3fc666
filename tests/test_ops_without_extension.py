"""The fused ops in a process where llama_fast._C cannot be imported: forward and backward still run
(Triton in the interpreter, or PyTorch math) and each op warns once that its backward falls back."""
import os
import subprocess
import sys
import textwrap


def test_ops_run_and_warn_without_the_extension():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["llama_fast._C"] = None  # makes `from . import _C` raise ImportError
        import torch
        import llama_fast._extension as ext
        from llama_fast import ops, reference
        assert not ext.AVAILABLE and not ext.has_kernel("cpu")
        torch.manual_seed(0)
        x, r = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40, requires_grad=True)
        w = torch.rand(40, requires_grad=True)
        fused = torch.randn(3, 2 * 24, requires_grad=True)
        q, k = torch.randn(2, 5, 4, 16, requires_grad=True), torch.randn(2, 5, 2, 16, requires_grad=True)
        cos, sin = reference.rope_tables(5, 16)
        leaves = (x, r, w, fused, q, k)

        def run(m):
            normed, h = m.add_rms_norm(x, r, w, 1e-6)
            return (m.rms_norm(x, w, 1e-6), normed, h, m.swiglu(*fused.chunk(2, -1)), *m.rope(q, k, cos, sin))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                got = run(ops)
                douts = [torch.randn_like(o) for o in got]  # random: ones would hide a mixed-up row or column
                grads = torch.autograd.grad(got, leaves, douts)
        want = run(reference)
        want_grads = torch.autograd.grad(want, leaves, douts)
        for a, b in zip(got + grads, want + want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        messages = sorted(str(c.message).split(" (")[0] for c in caught if "no compiled backward" in str(c.message))
        print(messages)
        assert messages == [f"llama_fast: no compiled backward for {op} on cpu"
                            for op in ("add_rms_norm", "rms_norm", "rope", "swiglu")], messages
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
