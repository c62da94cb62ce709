"""Near-duplicate removal and a diversity measure, from reference-model embeddings and faiss.

Embedding of an instance: the reference LM's last hidden state, mean-pooled over positions, L2-normalised
(cosine similarity = inner product). The reference model is small and already trained on this corpus's
distribution, so this costs one cheap forward pass.

* ``near_duplicates``: an exact inner-product index (``faiss.IndexFlatIP``); walking the corpus in order, an
  instance whose cosine similarity to an *earlier kept* instance is >= ``threshold`` is dropped.
* ``diversity``: mean pairwise cosine distance ``1 - cos`` over the set (on a seeded sample of at most 2,000
  instances). MiniPLM reports that difference sampling makes the corpus more diverse; the report shows this
  number for the scored and the refined instances.
"""

from __future__ import annotations

import numpy as np
import torch

from refine.core.instances import Instances


@torch.inference_mode()
def embed(inst: Instances, model_dir: str, batch_size: int = 16, lengths: np.ndarray | None = None) -> np.ndarray:
    """``lengths``: each row's real tokens (rows padded at the end, re-tokenized for a reference of another
    tokenizer): pooled over those only; right padding leaves a causal model's earlier states as they are."""
    from refine.core.model_folder import load_causal_lm

    model = load_causal_lm(model_dir, auto_class="base").eval()
    out = np.empty((len(inst), model.config.hidden_size), dtype=np.float32)
    for i in range(0, len(inst), batch_size):
        batch = torch.as_tensor(np.asarray(inst.tokens[i:i + batch_size], dtype=np.int64))
        hidden = model(input_ids=batch).last_hidden_state
        if lengths is None:
            pooled = hidden.mean(dim=1)
        else:
            n = torch.as_tensor(np.maximum(lengths[i:i + batch_size], 1), dtype=hidden.dtype)
            real = (torch.arange(hidden.shape[1])[None, :] < n[:, None]).to(hidden.dtype)
            pooled = (hidden * real[..., None]).sum(dim=1) / n[:, None]
        out[i:i + len(batch)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def near_duplicates(emb: np.ndarray, threshold: float, neighbours: int = 16) -> np.ndarray:
    """Boolean mask of instances to keep (first occurrence of each near-duplicate group wins)."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(emb, dtype=np.float32), min(neighbours + 1, len(emb)))
    keep = np.ones(len(emb), dtype=bool)
    for i in range(len(emb)):
        earlier = (ids[i] < i) & (ids[i] >= 0) & (sims[i] >= threshold)
        if earlier.any() and keep[ids[i][earlier]].any():
            keep[i] = False
    return keep


def diversity(emb: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Mean pairwise cosine distance over a seeded sample of the set."""
    if len(emb) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    x = emb[rng.choice(len(emb), size=min(sample, len(emb)), replace=False)].astype(np.float64)
    sims = x @ x.T
    n = len(x)
    return float(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))
