"""Stage 1: score a corpus with a teacher and a reference LM, keep what the teacher knows better (MiniPLM)."""
