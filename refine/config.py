"""Typed config of the refine stage (values in ``conf/refine.yaml``); unknown keys are errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from refine.core.errors import InputError


@dataclass
class PathsConfig:
    cache: str = ".cache"                  # fetched data, converted models, packed tokens (git-ignored)
    runs: str = "runs"                     # training runs (the reference model's among them)
    teacher: str = ".cache/models/smollm2-135m"
    corpus: str = ".cache/data/corpus"
    refined: str = ".cache/refined/default"


@dataclass
class PackConfig:
    seq_len: int = 256                     # MiniPLM packs 1024; 256 keeps CPU demos short
    max_instances: int = -1                # score N instances spread evenly over the corpus (-1: all)
    workers: int = 1                       # tokenizer processes (0: one per core); the output is the same


@dataclass
class ModelPassConfig:
    path: str = ""                         # HF folder, or a training run folder (its latest checkpoint)
    backend: str = "vllm"                  # vllm | hf | served (running vLLM servers at urls)
    dtype: str = "float32"                 # float32 | bfloat16
    batch_rows: int = 64                   # rows per engine call (vLLM schedules them by tokens)
    write_workers: int = 0                 # shards encoded + written while the next is scored (0: cores / 4, 1..4)
    engine: dict = field(default_factory=dict)   # extra engine kwargs, e.g. {tensor_parallel_size: 2}
    urls: list[str] = field(default_factory=list)  # backend served: base URLs, e.g. [http://gpu1:8000]
    # backend served: the NAME of the environment variable holding the servers' --api-key (never the key itself:
    # configs end up in manifests and logs); unset or empty: no key sent
    api_key_env: str = "VLLM_API_KEY"


@dataclass
class LogitsConfig:
    top_p: float = 0.95                    # PD paper's best: top-0.95 then top-50
    top_k: int = 50                        # 0 disables logit capture
    candidates: int = 0                    # top-K the engine returns per position (0: top_k); RS-KD draws from these
    rs_samples: int = 0                    # > 0: also an RS-KD sampled store (teacher/logits_rs, logits_rs/)
    rs_temperature: float = 1.0            # RS-KD proposal q ∝ p^(1/t)
    seed: int = 0                          # RS-KD draws
    codec: str = "zstd"                    # store codec: zstd (quantised, ~1/3 of raw) | raw (fp16)


@dataclass
class SelectConfig:
    alpha: float = 0.5                     # fraction kept (MiniPLM: 0.5)
    mode: str = "top"                      # top | sample | random
    temperature: float = 1.0               # sample mode: p ~ exp(score / temperature)
    seed: int = 0


@dataclass
class DedupConfig:
    """Reference-model embeddings + faiss: optional near-duplicate removal before scoring, diversity figures."""
    enabled: bool = False                  # drop near-duplicates before scoring
    threshold: float = 0.95                # cosine similarity at or above which a later instance is a duplicate
    diversity: bool = True                 # report diversity of scored vs refined instances (costs one cheap pass)


@dataclass
class RefineConfig:
    name: str = "default"
    corpus: str = "${paths.corpus}/train.jsonl"
    text_field: str = "text"
    max_doc_bytes: int = 64 << 20          # larger documents are skipped and counted (refine.core.corpus)
    out: str = "${paths.cache}/refined/${name}"
    shard_size: int = 128                  # instances per scoring shard (the unit of crash-resume)
    report_examples: int = 3               # top- and bottom-scored instances quoted in the report
    shard: str = "0/1"                     # i/N: this machine scores every N-th scoring shard, then stops
    merge_from: list[str] = field(default_factory=list)  # refine outputs of the parts: their shards are copied in
    overwrite: bool = False                # replace an out folder scored with other settings (default: refuse)
    select_only: bool = False              # re-select from out's saved scores only (make select): never scores
    paths: PathsConfig = field(default_factory=PathsConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    teacher: ModelPassConfig = field(default_factory=lambda: ModelPassConfig(path="${paths.teacher}"))
    reference: ModelPassConfig = field(default_factory=lambda: ModelPassConfig(path="${paths.runs}/reference"))
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


def to_refine_config(cfg: DictConfig) -> RefineConfig:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RefineConfig), cfg))  # type: ignore
    except OmegaConfBaseException as e:
        raise InputError(f"bad config: {str(e).splitlines()[0]}") from None
