"""Makes ``lm_eval --model llama_fast`` find llama_fast's model (llama_fast/lm_eval_model.py).

lm-eval 0.4.13 looks models up in its own registry only (no entry points), and our module
registers itself when imported, which ``lm_eval`` never does. So pip installs
``llama_fast_lm_eval_hook.pth`` beside the packages (setup.py), whose one line runs
``install()`` at interpreter start: an import hook that waits for ``lm_eval.models`` (where
the harness registers its own models) and then registers ``llama_fast`` with a lazy target.
Nothing is imported at start but this file; torch and llama_fast load when the harness is
first asked for the model.
"""
from __future__ import annotations

import importlib.abc
import sys

WATCHED = "lm_eval.models"
NAME, TARGET = "llama_fast", "llama_fast.lm_eval_model:LlamaFastLM"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for ``lm_eval.models`` and has its loader call
    ``register`` once the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is not None:
            def exec_and_register(module):
                exec_module(module)
                register()

            spec.loader.exec_module = exec_and_register  # this module's loader only
        return spec


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
