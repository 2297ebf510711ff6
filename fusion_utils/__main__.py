"""``python -m fusion_utils ...``: the command line, also as a module, so launchers can start it
(``torchrun --nproc_per_node 8 -m fusion_utils run masking ...``, ``accelerate launch -m fusion_utils run ...``)."""
import sys

from .cli import main

sys.exit(main())
