"""Stage 2: pretrain a student with LM loss plus knowledge distillation from a teacher."""

import refine  # noqa: F401  (sets the offline environment before transformers is imported)
