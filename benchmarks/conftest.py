"""pytest setup for the benchmarks: SIGTERM stops a run like Ctrl-C, so --benchmark-json still holds
the cases that finished (benchmarks/gpu_session.sh stops its steps with SIGTERM at its deadline)."""
from llama_fast.testing import stop_on_sigterm

stop_on_sigterm()
