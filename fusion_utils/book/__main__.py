"""``python -m fusion_utils.book build|clean|precompute ...``."""
import sys

from .driver import main

sys.exit(main())
