"""Typed configs: the schema every Hydra composition is checked against.

The YAML in ``conf/`` gives the values; these dataclasses give the keys and types. ``to_config`` merges the
composed config into the schema, so a misspelt or unknown key anywhere (CLI, experiment file, ``+key=``) is an
error, and the trainer gets plain typed objects instead of a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from refine.config import PathsConfig  # one schema for the shared paths group
from refine.core.errors import InputError


@dataclass
class ModelConfig:
    """A student built from scratch with transformers (``distill.models``). Vocabulary comes from the tokenizer."""
    name: str = "llama_tiny"
    arch: str = "llama"                    # llama | qwen2 | mamba
    tokenizer: str = "${paths.teacher}"    # the teacher's tokenizer unless cross-family (logit KD needs it)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 192
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    state_size: int = 16                   # mamba only: SSM state per channel
    expand: int = 2                        # mamba only: block width = expand * hidden_size


@dataclass
class DataConfig:
    """``train``/``val``: a packed-instances folder, or any corpus ``refine.core.corpus`` reads (packed on first
    use)."""
    train: str = "${paths.corpus}/train.jsonl"
    val: str = "${paths.corpus}/val.jsonl"
    text_field: str = "text"
    max_doc_bytes: int = 64 << 20          # larger documents are skipped and counted (refine.core.corpus)
    seq_len: int = 256
    batch_size: int = 4                    # sequences per micro-batch
    grad_accum: int = 1                    # micro-batches per optimizer step


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0                 # max global grad norm; <= 0 disables clipping


@dataclass
class ScheduleConfig:
    """Learning-rate shape over ``trainer.max_steps``: ``cosine``, ``wsd`` (warmup-stable-decay) or ``constant``."""
    name: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1              # floor at the end, as a fraction of the peak lr
    decay_fraction: float = 0.2            # wsd: the last fraction of steps decays
    decay_shape: str = "linear"            # wsd decay: linear | cosine | sqrt


@dataclass
class AlphaConfig:
    """The KD weight alpha in L = (1 - alpha) * L_lm + alpha * L_kd, as a function of the step.

    constant: ``peak``; linear_increase: floor -> peak; linear_decrease: peak -> floor; periodic: cosine
    between floor and peak, ``periods`` cycles, starting at peak; wsd: floor -> peak over ``warmup_steps``,
    hold, then back to floor over the last ``decay_fraction`` of the steps (the WSD learning-rate shape; with a
    WSD learning rate this is the PD paper's best setting).
    """
    schedule: str = "constant"
    peak: float = 0.9                      # PD paper: static 0.9 best among constants
    floor: float = 0.0
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    periods: int = 2


@dataclass
class KDConfig:
    """Distillation: off (LM loss only), or a teacher signal from stored logits or a live teacher."""
    signal: str = "none"                   # none | offline | online
    logits: str = ""                       # offline: the refine logits store aligned with data.train
    teacher: str = "${paths.teacher}"      # online: an HF teacher folder (frozen)
    teacher_dtype: str = "float32"         # the live/validation teacher's own dtype (float32 | bfloat16 | float16),
                                           # never the student's autocast
    top_p: float = 0.95                    # online truncation (offline stores carry their own)
    top_k: int = 50                        # online; 0 = full vocabulary
    rs_samples: int = 0                    # online: > 0 samples this many tokens per position (RS-KD) instead
    rs_temperature: float = 1.0            # online RS-KD proposal temperature (offline stores carry their own)
    loss: str = "kld"                      # kld | nll | rkl | mse
    temperature: float = 1.0
    adaptive_temperature: bool = False     # AdaKD-style per-position temperature (distill.losses)
    adaptive_beta: float = 1.0
    missing_mass: str = "auto"             # auto | renorm | tail | none (distill.losses); auto: renorm for
                                           # top-p-k, RS-KD: none online, tail offline (distill.kd)
    tau_squared: bool = False              # multiply the KD loss by tau^2 (Hinton's gradient-scale fix)
    val_kl_batches: int = 2                # val batches for KL(teacher || student) at each eval (0: off)
    alpha: AlphaConfig = field(default_factory=AlphaConfig)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 20                 # val batches per evaluation (a fixed set, the same every time)
    ckpt_every: int = 50
    keep_checkpoints: int = 2              # most recent trainer checkpoints kept (the final one always)
    progress: bool = True                  # tqdm progress bar
    tensorboard: bool = True
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    precision: str = "auto"                # auto = bf16 autocast on CUDA, fp32 elsewhere | fp32 | bf16
    parallel: str = "ddp"                  # under torchrun: ddp | fsdp (distill.distributed)
    nan_policy: str = "stop"               # non-finite loss/gradient: stop (one error line) | skip the batch
    max_nan_skips: int = 10                # skip: stop anyway after this many non-finite steps in a row
    threads: int = 0                       # torch intra-op threads (0: torch's default); sweeps run jobs side by side


@dataclass
class EvalConfig:
    """After training, evaluate the final checkpoint (``distill.evaluate``) into its ``eval.json``."""
    tasks: list[str] = field(default_factory=list)   # lm-eval tasks/tags from conf/eval/tasks, e.g. [rd_piqa]
    limit: int = 0                         # items per task (0: all)
    batch_size: int = 8


@dataclass
class TrainConfig:
    run_name: str = "train"
    run_dir: str = "${paths.runs}/${run_name}"
    seed: int = 0
    resume: bool = True                    # continue from the run folder's latest checkpoint if there is one
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def to_config(cfg: DictConfig) -> TrainConfig:
    """Check a composed config against the schema (unknown keys, wrong types) and resolve it."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise InputError(f"bad config: {msg}" + (f" (key: {key})" if key and key not in msg else "")) from None
