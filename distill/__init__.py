"""Stage 2: pretrain a student with LM loss plus knowledge distillation from a teacher."""
