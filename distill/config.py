"""Typed configs of the trainer: the one place every default is written.

Why a schema registered with Hydra's ConfigStore rather than YAML only: the dataclasses are the base of every
composition (``conf/train.yaml``: ``defaults: [train_schema, ...]``), so Hydra's own interpolations (the run
folder) see the defaults, an unknown key or a bad choice (the ``StrEnum`` fields) fails while the config is
composed, and the trainer gets typed objects. YAML holds only what differs from these defaults: group options
(``conf/model/*.yaml`` sizes, ``conf/schedule/wsd.yaml``...) and experiments (``@package _global_`` overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, auto

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from refine.core.errors import InputError
from refine.core.paths import PathsConfig  # one schema for the shared paths group
from refine.core.schema import Checked, Dtype, to_typed


class Arch(StrEnum):
    llama = auto()
    qwen2 = auto()
    mamba = auto()


class LrSchedule(StrEnum):
    cosine = auto()
    wsd = auto()
    constant = auto()


class DecayShape(StrEnum):
    linear = auto()
    cosine = auto()
    sqrt = auto()


class AlphaSchedule(StrEnum):
    constant = auto()
    linear_increase = auto()
    linear_decrease = auto()
    periodic = auto()
    wsd = auto()


class Signal(StrEnum):
    none = auto()       # LM loss only
    offline = auto()    # stored top-p-k (or RS-KD) logits from the refine stage
    online = auto()     # a live HF teacher run on every batch
    cross_tokenizer = auto()   # another tokenizer's stored logits, byte-aligned (distill.token_alignment)


class KDLoss(StrEnum):
    kld = auto()
    nll = auto()
    rkl = auto()
    mse = auto()


class MissingMass(StrEnum):    # (string values: a member named auto hides enum.auto in the class body)
    auto = "auto"       # renorm for top-p-k; RS-KD: none online, tail offline (auto_missing_mass)
    renorm = "renorm"
    tail = "tail"
    none = "none"


class XtokTargets(StrEnum):   # kd.signal=cross_tokenizer: teacher candidates -> student ids (distill.token_alignment)
    exact = auto()        # a teacher token whose bytes are one student token; the rest is missing mass
    first_token = auto()  # the first student token of the teacher token's bytes: all of the mass, summed per id
    skip = auto()         # exact, without the positions whose teacher next token is longer than the student's


class Precision(StrEnum):
    auto = "auto"       # bf16 autocast on CUDA, fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"


class Parallel(StrEnum):
    ddp = auto()
    fsdp = auto()


class NanPolicy(StrEnum):
    stop = auto()       # one error line, before the update
    skip = auto()       # drop that batch's update (at most trainer.max_nan_skips in a row)


class Logger(StrEnum):
    """Where a run's scalars go besides metrics.jsonl (distill.trackers)."""
    tensorboard = auto()
    wandb = auto()
    trackio = auto()


class WandbMode(StrEnum):
    online = auto()
    offline = auto()      # a local run folder, uploaded later by `wandb sync`
    disabled = auto()


@dataclass
class ModelConfig(Checked):
    """A student built from scratch with transformers (``distill.models``). Vocabulary comes from the tokenizer.
    These defaults are the tests' ``llama_tiny``; ``conf/model/*.yaml`` give the other sizes (``llama_small`` by
    default)."""
    name: str = "llama_tiny"
    arch: Arch = Arch.llama
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
class DataConfig(Checked):
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
class OptimConfig(Checked):
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0                 # max global grad norm; <= 0 disables clipping


@dataclass
class ScheduleConfig(Checked):
    """Learning-rate shape over ``trainer.max_steps``: ``cosine``, ``wsd`` (warmup-stable-decay) or ``constant``."""
    name: LrSchedule = LrSchedule.cosine
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1              # floor at the end, as a fraction of the peak lr
    decay_fraction: float = 0.2            # wsd: the last fraction of steps decays
    decay_shape: DecayShape = DecayShape.linear   # wsd decay


@dataclass
class AlphaConfig(Checked):
    """The KD weight alpha in L = (1 - alpha) * L_lm + alpha * L_kd, as a function of the step.

    constant: ``peak``; linear_increase: floor -> peak; linear_decrease: peak -> floor; periodic: cosine
    between floor and peak, ``periods`` cycles, starting at peak; wsd: floor -> peak over ``warmup_steps``,
    hold, then back to floor over the last ``decay_fraction`` of the steps (the WSD learning-rate shape; with a
    WSD learning rate this is the PD paper's best setting).
    """
    schedule: AlphaSchedule = AlphaSchedule.constant
    peak: float = 0.9                      # PD paper: static 0.9 best among constants
    floor: float = 0.0
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    periods: int = 2


@dataclass
class KDConfig(Checked):
    """Distillation: off (LM loss only), or a teacher signal from stored logits or a live teacher."""
    signal: Signal = Signal.none
    logits: str = ""                       # offline, cross_tokenizer: the refine logits store aligned with data.train
    teacher: str = "${paths.teacher}"      # online: an HF teacher folder (frozen); cross_tokenizer: its tokenizer
    xtok_targets: XtokTargets = XtokTargets.first_token   # cross_tokenizer: the teacher->student id rule
    teacher_dtype: Dtype = Dtype.float32   # the live/validation teacher's own dtype, never the student's autocast
    top_p: float = 0.95                    # online truncation (offline stores carry their own)
    top_k: int = 50                        # online; 0 = full vocabulary
    rs_samples: int = 0                    # online: > 0 samples this many tokens per position (RS-KD) instead
    rs_temperature: float = 1.0            # online RS-KD proposal temperature (offline stores carry their own)
    loss: KDLoss = KDLoss.kld
    temperature: float = 1.0
    adaptive_temperature: bool = False     # AdaKD-style per-position temperature (distill.losses)
    adaptive_beta: float = 1.0
    missing_mass: MissingMass = MissingMass.auto   # distill.losses; auto: auto_missing_mass
    tau_squared: bool = False              # multiply the KD loss by tau^2 (Hinton's gradient-scale fix)
    val_kl_batches: int = 2                # val batches for KL(teacher || student) at each eval (0: off)
    alpha: AlphaConfig = field(default_factory=AlphaConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.signal in (Signal.offline, Signal.cross_tokenizer) and not self.logits:
            raise InputError(f"kd.signal={self.signal} needs kd.logits (a refine logits store aligned with "
                             f"data.train)")
        if self.signal == Signal.online:      # a stored signal's kind is known once its store is open
            self.check_targets(sampled=self.rs_samples > 0)
        elif self.missing_mass != MissingMass.auto:
            self.check_targets(sampled=None)

    def check_targets(self, sampled: bool | None) -> str:
        """The loss/temperature/missing-mass combination for a signal of this kind (``sampled``: RS-KD
        weights; None: not known yet, only what holds for both kinds is checked); returns the missing-mass
        policy in force (``auto`` resolved). The one place these rules live: composition checks what the config
        says, ``distill.kd.Distiller`` the rest once a store's header tells its kind."""
        scaled = self.temperature != 1 or self.adaptive_temperature
        if sampled and (scaled or self.loss == KDLoss.mse):
            # Sampled targets are importance weights, not teacher log-probs: rescaling them by 1/tau or
            # regressing logits on them estimates nothing. Their temperature is the sampling temperature.
            raise InputError("a sampled (RS-KD) teacher signal needs kd.temperature=1, no adaptive temperature "
                             "and a kld | nll | rkl loss; set the sampling temperature when capturing instead")
        policy = self.missing_mass
        if policy == MissingMass.auto:
            if sampled is None:
                return policy
            policy = auto_missing_mass(self.signal, sampled)
        if policy in (MissingMass.tail, MissingMass.none) and scaled:
            raise InputError(f"kd.missing_mass={policy} needs kd.temperature=1 and no adaptive "
                             f"temperature (the stored weights are tau = 1 ones); use renorm for tau != 1")
        if policy == MissingMass.none and self.loss == KDLoss.rkl:
            raise InputError("kd.loss=rkl needs a normalised teacher target: kd.missing_mass=renorm or tail")
        return policy


def auto_missing_mass(signal: str, sampled: bool) -> MissingMass:
    """``kd.missing_mass=auto``. Top-p-k: ``renorm``, the PD paper's target. Sampled (RS-KD): online draws come
    from the full vocabulary, where ``none`` (importance-weighted CE) is unbiased at any sampling temperature;
    stored draws come from the engine's top-K plus a lumped tail, whose tokens are not stored: ``tail`` keeps
    the unbiased weights and tail mass and was measured the least biased there (tests/test_rs_kd.py)."""
    if not sampled:
        return MissingMass.renorm
    return MissingMass.none if signal == Signal.online else MissingMass.tail


@dataclass
class TrainerConfig(Checked):
    """CPU-sized: 200 steps x 4 x 256 tokens; scale ``data.batch_size`` and ``max_steps`` up on a GPU."""
    max_steps: int = 200
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8                  # val batches per evaluation (a fixed set, the same every time)
    # end the run once this many validations in a row have not improved the best val loss by more than
    # early_stop_min_delta nats (distill.early_stop; 0: run to max_steps)
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    ckpt_every: int = 50
    keep_checkpoints: int = 2              # most recent trainer checkpoints kept (the final one always)
    progress: bool = True                  # tqdm progress bar
    # where the scalars also go (distill.trackers), any subset: [tensorboard,wandb,trackio]
    loggers: list[Logger] = field(default_factory=lambda: [Logger.tensorboard])
    log_project: str = "refine-distill"    # the wandb / trackio project
    log_name: str | None = None            # the wandb / trackio run (None: the run folder's name)
    wandb_mode: WandbMode | None = None    # None: WANDB_MODE if set, else wandb's default (online)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    parallel: Parallel = Parallel.ddp      # under torchrun (distill.distributed); fsdp: students too big to replicate
    nan_policy: NanPolicy = NanPolicy.stop  # a non-finite loss or gradient
    max_nan_skips: int = 10                # skip: stop anyway after this many non-finite steps in a row
    threads: int = 0                       # torch intra-op threads (0: torch's default); sweeps run jobs side by side


@dataclass
class EvalConfig(Checked):
    """After training, evaluate the final checkpoint (``distill.evaluate``) into its ``eval.json``."""
    tasks: list[str] = field(default_factory=list)   # lm-eval tasks/tags from conf/eval/tasks, e.g. [rd_piqa]
    limit: int = 0                         # items per task (0: all)
    batch_size: int = 8


@dataclass
class TrainConfig(Checked):
    run_name: str = "train"
    # conf/train.yaml: Hydra's output folder (a sweep job's own); None only under --cfg job --resolve, before Hydra
    # has one (optional: that printout must not fail)
    run_dir: str | None = "${paths.runs}/${run_name}"
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


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_config(cfg: DictConfig) -> TrainConfig:
    """Check a composed config against the schema (unknown keys, wrong types, bad choices) and resolve it."""
    return to_typed(TrainConfig, cfg)
