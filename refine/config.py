"""Typed config of the refine stage: the one place every default is written.

Registered with Hydra's ConfigStore as ``refine_schema``, the base of ``conf/refine.yaml`` (the same choice as
``distill.config``, for the same reasons): Hydra's own interpolations (``hydra.run.dir: ${out}``) see these
defaults, unknown keys and bad choices fail while the config is composed, and the YAML states only what differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum, auto

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from refine.core.errors import InputError
from refine.core.paths import PathsConfig
from refine.core.schema import Checked, Dtype, to_typed


class Backend(StrEnum):
    """How a model pass is scored (``refine.scorers.registry``)."""
    vllm = auto()       # an in-process vLLM engine
    hf = auto()         # transformers
    served = auto()     # running vLLM servers at ``urls``


class Codec(StrEnum):
    """The logits store's codec (``refine.core.logits.format``)."""
    zstd = auto()       # quantised, ~1/3 of raw's bytes: ids exact, sqrt(p) in 48 levels
    raw = auto()        # fp16


class SelectMode(StrEnum):
    top = auto()        # the top alpha by score
    sample = auto()     # p ~ exp(score / temperature), without replacement
    random = auto()     # the same fraction chosen blindly (the control)


@dataclass
class PackConfig(Checked):
    seq_len: int = 256                     # MiniPLM packs 1024; 256 keeps CPU demos short
    max_instances: int = -1                # score N instances spread evenly over the corpus (-1: all)
    workers: int = 1                       # tokenizer processes (0: one per core); the output is the same


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class ModelPassConfig(Checked):
    """One model's scoring pass (the teacher's and the reference's differ only in ``path``).

    ``engine``: extra engine kwargs. vllm: ``vllm.LLM`` kwargs, e.g. {tensor_parallel_size: 2,
    pipeline_parallel_size: 2, enforce_eager: true}; the in-process engine has no data parallelism (vLLM refuses
    data_parallel_size > 1 there): for that, run servers (``--data-parallel-size N``, or N of them) and use
    backend served. served: {served_model: NAME (their --served-model-name; default: their only model),
    max_concurrency: 8 (requests in flight over all urls), timeout: 300 (s), retries: 3}; dtype, max_model_len and
    --max-logprobs (>= the top-K asked for) are the servers' own settings. Override with
    ``+teacher.engine.KEY=VALUE`` or ``++teacher.engine='{KEY: VALUE, ...}'`` (a bare ``teacher.engine={..}`` fails).
    """
    path: str = ""                         # HF folder, or a training run folder (its latest checkpoint); with
                                           # backend served only its config.json + tokenizer are read
    backend: Backend = Backend.vllm
    dtype: Dtype = Dtype.float32
    batch_rows: int = 64                   # rows per engine call (vLLM schedules them by tokens)
    write_workers: int = 0                 # shards encoded + written while the next is scored (0: cores / 4, 1..4)
    engine: dict = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)  # backend served: base URLs, e.g. [http://gpu1:8000]
    # backend served: the NAME of the environment variable holding the servers' --api-key (never the key itself:
    # configs end up in manifests and logs); unset or empty: no key sent
    api_key_env: str = "VLLM_API_KEY"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api_key_env and not _ENV_NAME.fullmatch(self.api_key_env):
            raise InputError("api_key_env must be the name of an environment variable (letters, digits and _), "
                             "not a key: configs are saved in manifests (the value given is not shown)")


@dataclass
class LogitsConfig(Checked):
    top_p: float = 0.95                    # PD paper's best: top-0.95 then top-50
    top_k: int = 50                        # 0 disables logit capture
    candidates: int = 0                    # top-K the engine returns per position (0: top_k); RS-KD draws from these
    rs_samples: int = 0                    # > 0: also an RS-KD sampled store (teacher/logits_rs, logits_rs/)
    rs_temperature: float = 1.0            # RS-KD proposal q ∝ p^(1/t)
    seed: int = 0                          # RS-KD draws
    codec: Codec = Codec.zstd


class ScoreUnit(StrEnum):
    tokens = auto()     # mean NLL per token (MiniPLM)
    bytes = auto()      # bits per byte of the same text: a scale that does not depend on the tokenizer


@dataclass
class SelectConfig(Checked):
    alpha: float = 0.5                     # fraction kept (MiniPLM: 0.5)
    mode: SelectMode = SelectMode.top
    normalize: ScoreUnit = ScoreUnit.tokens    # score = reference minus teacher, per token or per byte
    temperature: float = 1.0               # sample mode: p ~ exp(score / temperature)
    seed: int = 0


@dataclass
class DedupConfig(Checked):
    """Reference-model embeddings + faiss: optional near-duplicate removal before scoring, diversity figures."""
    enabled: bool = False                  # drop near-duplicates before scoring
    threshold: float = 0.95                # cosine similarity at or above which a later instance is a duplicate
    diversity: bool = True                 # report diversity of scored vs refined instances (costs one cheap pass)


class RefSizing(StrEnum):     # (string values: a member named auto hides enum.auto in the class body)
    auto = "auto"       # the teacher's family scaled down, trained on D_ref to a budget (refine.reference_size)
    fixed = "fixed"     # the trainer's ``experiment`` as it is (the CPU miniature: tests, make demo)


@dataclass
class RefSplitConfig(Checked):
    """D_ref (``refine.reference``): with ``reference.path`` empty, the share of the corpus's documents (by a hash
    of their id) held out of scoring to train the reference LM on, with the trainer's ``experiment``; its size
    and budget by ``sizing``."""
    fraction: float = 0.05                 # of the documents; a tenth of D_ref is the reference's validation text
    # a token budget (teacher tokens, validation included; 0: none): D_ref is then the lowest-hash documents up to
    # it, never more than ``fraction`` of them (``refine.core.holdout.budget_fraction``)
    max_tokens: int = 0
    seed: int = 0                          # which documents: another seed, another D_ref
    min_tokens: int = 100_000              # a smaller D_ref is refused (too little to train a reference on)
    experiment: str = "reference"          # conf/experiment/<name>.yaml of the trainer
    sizing: RefSizing = RefSizing.auto
    # auto: parameters relative to the teacher's (MiniPLM: 104M for 1.8B, about 1/17)
    param_ratio: float = 0.0588
    # auto: training tokens = epochs x D_ref's, at least min_train_tokens (a small D_ref is repeated, early
    # stopping on its validation text ends it), at most max_train_tokens (MiniPLM: 5B, one pass)
    epochs: float = 1.0
    min_train_tokens: int = 2_000_000
    max_train_tokens: int = 5_000_000_000
    patience: int = 3                      # auto: validations without improvement that end its training
    overrides: list[str] = field(default_factory=list)   # more trainer overrides, e.g. [trainer.max_steps=2000]


@dataclass
class RefineConfig(Checked):
    name: str = "default"
    corpus: str = "${paths.corpus}/train.jsonl"
    text_field: str = "text"
    max_doc_bytes: int = 64 << 20          # larger documents are skipped and counted (refine.core.corpus)
    out: str = "${paths.cache}/refined/${name}"
    shard_size: int = 128                  # instances per scoring shard (the unit of crash-resume)
    report_examples: int = 3               # top- and bottom-scored instances quoted in the report
    # Spread scoring over N machines: each runs `python -m refine --shard i/N` (or shard=i/N; shard=auto: from a
    # Slurm array's or torchrun's variables, refine.array_job), scoring every N-th scoring shard. Parts sharing
    # one out folder: the part that ends last finishes the run; parts in their own folders: one run with
    # merge_from=[their out folders] copies them in. Either way the outputs are the unsharded run's.
    shard: str = "0/1"
    merge_from: list[str] = field(default_factory=list)
    # An out folder scored with other settings (scoring.json: corpus, packing, models, dtype, backend, capture) is
    # refused, never rescored over; overwrite=true replaces it (refused too while another run on this host writes it).
    overwrite: bool = False
    # Re-select with this command's select.* from the scores out holds, reading what was scored from the folder's
    # own record (make select): nothing is packed or scored; no saved scores is a one-line error.
    select_only: bool = False
    verbose: bool = False                  # also show library warnings and the scoring child's stderr (see logs/)
    paths: PathsConfig = field(default_factory=PathsConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    teacher: ModelPassConfig = field(default_factory=lambda: ModelPassConfig(path="${paths.teacher}"))
    # empty: carve D_ref out of the corpus and train the reference on it (ref_split); else an HF folder, hub id or
    # run, e.g. a small pretrained sibling of the teacher; another tokenizer needs select.normalize=bytes
    reference: ModelPassConfig = field(default_factory=ModelPassConfig)
    ref_split: RefSplitConfig = field(default_factory=RefSplitConfig)
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


ConfigStore.instance().store(name="refine_schema", node=RefineConfig)


def to_refine_config(cfg: DictConfig) -> RefineConfig:
    """Check a composed config against the schema (unknown keys, wrong types, bad choices) and resolve it."""
    return to_typed(RefineConfig, cfg)
