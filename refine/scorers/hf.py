"""The transformers scorer: same interface and numbers as the vLLM scorer (``refine.scorers.base``), plain torch.

Used by tests, for models vLLM cannot load, and to cross-check vLLM (``tests/test_scorers.py`` compares the two).
"""

from __future__ import annotations

import numpy as np
import torch

from refine.core.errors import InputError
from refine.core.forward import DTYPES, forward_logits
from refine.core.model_folder import load_causal_lm
from refine.scorers.base import Scores


class HFScorer:
    def __init__(self, model_dir: str, top_k: int = 0, dtype: str = "float32", batch_size: int = 8,
                 device: str = "cpu", trust_remote_code: bool = False, bos_id: int | None = None):
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.top_k, self.batch_size, self.device, self.bos_id = top_k, batch_size, torch.device(device), bos_id
        self.model = load_causal_lm(model_dir, DTYPES[dtype], trust_remote_code).to(self.device).eval()
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if not 0 <= top_k <= vocab:
            raise InputError(f"top_k must be in 0..{vocab} (the model's vocabulary), got {top_k}")

    @torch.inference_mode()
    def score(self, rows: np.ndarray) -> Scores:
        token_lp, ids, lps = [], [], []
        for i in range(0, len(rows), self.batch_size):
            batch = torch.as_tensor(np.asarray(rows[i:i + self.batch_size], dtype=np.int64), device=self.device)
            # log_softmax in fp32 whatever the model dtype: bf16 log-probs are visibly off.
            logp = torch.log_softmax(forward_logits(self.model, batch, self.bos_id)[:, :-1].float(), dim=-1)
            token_lp.append(logp.gather(-1, batch[:, 1:, None]).squeeze(-1).cpu())
            if self.top_k:
                top = torch.topk(logp, self.top_k, dim=-1)
                ids.append(top.indices.to(torch.int32).cpu())
                lps.append(top.values.cpu())
        return Scores(torch.cat(token_lp).numpy(),
                      torch.cat(ids).numpy() if self.top_k else None,
                      torch.cat(lps).numpy() if self.top_k else None)

    def close(self) -> None:
        self.model = None
