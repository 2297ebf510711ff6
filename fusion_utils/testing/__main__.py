"""``python -m fusion_utils.testing [DEST] [ARCH ...]``: save tiny models for a book build."""
from . import main

raise SystemExit(main())
