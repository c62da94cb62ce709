"""``python -m refine.core.logits info | retruncate | convert | link``: ``refine.core.logits.tools.main``."""

from refine.core.logits.tools import main

main()
