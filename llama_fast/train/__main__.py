"""``python -m llama_fast.train`` / ``torchrun --nproc_per_node=N -m llama_fast.train``."""
import sys

from . import main

sys.exit(main())
