"""Stage 1: score a corpus with a teacher and a reference LM, keep what the teacher knows better (MiniPLM)."""

import os

# Offline by construction: models and data come from local folders, never from a hub at run time.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
