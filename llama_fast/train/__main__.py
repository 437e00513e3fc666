"""``python -m llama_fast.train`` / ``torchrun --nproc_per_node=N -m llama_fast.train``: ``llama-fast train``."""
import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
