"""The run configuration's sections: typed dataclasses, every key with its default and a one-line doc, and their dict form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dist_train.config.data import DataConfig, SplitConfig  # noqa: F401 (the sections' names)
from dist_train.config.search import HPOConfig


@dataclass
class ModelConfig:
    """Which network, its head, and which parts of it train."""

    name: str = "small_cnn"
    """`small_cnn` or `mlp` (for tiny images), any torchvision classification model name (e.g. resnet18), or
    `timm/<name>` for any of timm.list_models() (e.g. timm/convnext_tiny, timm/vit_base_patch16_224.augreg_in21k:
    a tag picks the pretrained_cfg)."""
    width: int = 32
    """small_cnn: channels of the first block; mlp: hidden units."""
    sync_batchnorm: bool = False
    """Batch statistics over the global batch of all processes instead of each process's own."""
    num_classes: int | None = None
    """None: the number of classes found in the data."""
    pretrained: str | None = None
    """Local weights file (.safetensors, or a weights-only torch .pt/.pth/.bin); a head of another size is
    skipped. timm models also take the folder timm caches from the Hugging Face hub (its model.safetensors and
    config.json, whose pretrained_cfg then sets data.image_size/mean/std). Nothing is ever downloaded."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name prefixes to freeze, e.g. [conv1, bn1, layer1] for transfer learning."""
    dropout: float = 0.0
    """Dropout before the classifier: small_cnn, mlp, and timm's drop_rate (torchvision models keep their own)."""
    drop_path_rate: float | None = None
    """Stochastic depth: timm's drop_path_rate, torchvision's stochastic_depth_prob (efficientnet, convnext,
    swin, maxvit); None: the model's own default (timm 0; torchvision's efficientnet 0.2, convnext 0.1)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them (less memory, about 30% more compute): timm's
    set_grad_checkpointing, or torch.utils.checkpoint around the blocks of torchvision's resnet/resnext/
    wide_resnet, efficientnet, mobilenet, convnext, regnet, swin and vit families (and small_cnn)."""
    file: str | None = None
    """Your own network: a Python file defining `build_model(cfg: ModelConfig, num_classes: int,
    in_channels: int, image_size: int) -> nn.Module`, used instead of `name`; pretrained and freeze
    still apply. Relative to the config file's directory."""


@dataclass
class LossConfig:
    """The training objective."""

    name: Literal["cross_entropy", "focal", "f1", "bce", "asl"] = "cross_entropy"
    """One class per row: cross_entropy, focal or f1 (soft macro-F1). task.kind=multilabel: bce (binary cross-entropy
    per class; cross_entropy means it there), focal (sigmoid focal, torchvision's) or asl (asymmetric loss, timm's
    AsymmetricLossMultiLabel)."""
    label_smoothing: float = 0.0
    """cross_entropy: mass spread uniformly over all classes; multilabel (bce, focal, asl): each target moved that
    far towards 0.5."""
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    """focal only: weight of the true class's term (None: no weighting)."""
    class_weights: list[float] | None = None
    """cross_entropy/focal (and multilabel's losses): per-class weights, one per class."""
    pos_weight: Literal["balanced"] | list[float] | None = None
    """multilabel: weight of each class's positive term (torch's BCEWithLogitsLoss pos_weight), one per class, or
    balanced: negatives / positives of each class in the training table. None: 1."""
    asl_gamma_neg: float = 4.0
    """asl: focusing of the negative terms (timm's gamma_neg)."""
    asl_gamma_pos: float = 1.0
    """asl: focusing of the positive terms (timm's gamma_pos)."""
    asl_clip: float = 0.05
    """asl: probability margin shifted onto the negatives (timm's clip; 0: off)."""
    file: str | None = None
    """Your own loss: a Python file defining `build_loss(cfg: LossConfig, num_classes: int) -> nn.Module`,
    used instead of `name`; it must return one loss per sample (a `reduction` attribute is set to "none").
    Relative to the config file's directory."""


@dataclass
class HeadConfig:
    """One head of a multihead task: its label column, classes, loss and weight."""

    name: str = "head"
    """Used in metric names: val_<name>_accuracy, val_<name>_f1_macro, ..."""
    column: str = "label"
    """The CSV column with this head's label."""
    classes: list[str] | None = None
    """Class names in output order; None: the sorted labels found in the column."""
    weight: float = 1.0
    """This head's share of the loss: loss = sum of weight x the head's loss."""
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TaskConfig:
    """What the model predicts (the submission writes the predicted class, value or score)."""

    kind: Literal["classification", "multihead", "multilabel", "regression", "ranking"] = "classification"
    """classification: one class per image (data.label_column); multihead: several heads over one backbone
    (task.heads), the predicted class is their combination; multilabel: any number of classes per image (a
    column of delimited class names, data.label_column, or one 0/1 column per class, task.targets); regression:
    numbers (task.targets columns); ranking: a score per image, ranked within each query (task.query_column)
    against data.label_column's relevance."""
    heads: list[HeadConfig] = field(default_factory=list)
    """multihead: the heads in order. Combined class = mixed-radix number of the head classes in this order,
    e.g. mask (3), gender (2), age (3): 6 * mask + 3 * gender + age."""
    targets: list[str] = field(default_factory=list)
    """regression: the numeric target columns (default: [data.label_column]); one model output each. multilabel:
    one 0/1 column per class, the column names being the class names (default: none, data.label_column holds
    the delimited class names)."""
    label_separator: str = " "
    """multilabel: what separates the class names in data.label_column's cells ("3 7 12"; an empty cell: no class)."""
    threshold: float | Literal["tune"] = 0.5
    """multilabel: a class is predicted where its probability reaches this; tune: one threshold per class, each
    maximising that class's F-beta (task.threshold_beta) on the validation predictions -- under cv.folds on the
    out-of-fold predictions (cv_summary.json also gives the OOF score with each fold's thresholds tuned on the
    other folds). The thresholds go with the checkpoint (and the cross-validation directory) to predict.py."""
    threshold_beta: float = 1.0
    """multilabel, task.threshold=tune: the F-beta each class's threshold maximises (2: recall weighs more)."""
    loss: Literal["mse", "l1", "huber"] = "mse"
    """regression and ranking (pointwise on the relevance)."""
    huber_delta: float = 1.0
    query_column: str = "query"
    """ranking: the CSV column grouping rows into queries."""
    ndcg_k: int = 10
    """ranking: NDCG@k's cut-off."""
    roc_auc: bool = False
    """classification: also report val_roc_auc (binary, or one-vs-rest macro)."""
    top_k: list[int] = field(default_factory=list)
    """classification: also report val_top<k>_accuracy for each k, e.g. [5]."""


@dataclass
class OptimConfig:
    """Optimizer and its hyper-parameters."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False
    """False puts normalisation weights and biases (tensors of one dimension), and the tensors a timm model
    names in no_weight_decay() (position embeddings, class tokens), in a group without weight decay."""
    layer_decay: float | None = None
    """Layer-wise LR decay (timm's param_groups_layer_decay): the head trains at `lr` and each layer group below
    at layer_decay times the one above, e.g. 0.75; needs a model with group_matcher() (timm's). None: off."""
    momentum: float = 0.9
    """sgd only."""
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: bool | None = None
    """torch's fused optimizer kernels (one kernel for all parameters; on CUDA and CPU; they also let a
    non-finite step be skipped without a host sync); None: fused unless DeepSpeed runs the optimizer."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, a function of optimizer steps (never of processes or micro-batches)."""

    name: Literal["constant", "step", "cosine", "plateau"] = "cosine"
    warmup_epochs: float = 0.0
    """Linear warm-up length, in epochs (converted to optimizer steps)."""
    warmup_start_factor: float = 0.01
    step_size_epochs: float = 10.0
    """step: multiply the LR by `gamma` every this many epochs."""
    gamma: float = 0.1
    min_lr: float = 0.0
    """cosine: the LR reached at the last step; plateau: the floor."""
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    """plateau: evaluations without improvement of `checkpoint.monitor` before the LR drops."""
    plateau_threshold: float = 1e-4


@dataclass
class TrainConfig:
    """The loop."""

    epochs: int = 10
    max_steps: int | None = None
    """Stop after this many optimizer steps in all (then validate and save); None: run all epochs."""
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """fp16 needs a GPU; bf16 runs on recent GPUs and on CPU."""
    channels_last: bool | None = None
    """Model and images in channels_last memory layout (faster convolutions with tensor cores); None: on CUDA."""
    compile: bool = False
    """torch.compile the model (inductor): slower start, faster steps."""
    log_every_n_steps: int = 10
    """Training loss, LR and gradient norm go to TensorBoard every this many optimizer steps; when the output is not a
    terminal (a SLURM .out file, `make demo > log`), a line with them, the epoch's progress and an ETA is printed too,
    in place of the progress bars."""
    log_every_n_seconds: float | None = None
    """Output not a terminal: print those step lines at most this often (e.g. 60 for a long epoch in a batch job's
    log); None: every train.log_every_n_steps."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement of `checkpoint.monitor`; 0 disables."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): slower, reproducible to the bit on one machine."""
    distributed_timeout_s: int = 600
    """A rank that makes no progress this long is hung: the job stops, naming it (the collectives'
    own timeout, 60 s longer, is the backstop)."""
    nonfinite: Literal["skip", "stop", "ignore"] = "skip"
    """A step whose loss or gradient is NaN/Inf on any rank: every rank skips it (skip) or the run
    stops (stop); ignore saves the per-step check (one tiny all-reduce). DeepSpeed steps inside
    backward, so there skip acts as stop."""
    max_bad_steps: int = 3
    """skip: stop after this many non-finite steps in a row."""
    find_batch_size: bool = False
    """Before training, halve data.batch_size until a forward + backward fits in accelerator memory;
    every rank then uses the smallest size any rank found."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights (e.g. 0.999; updated after every optimizer step):
    validation, `best` and inference then use the average. None: off."""
    ema_warmup: bool = True
    """Lower the EMA decay for early steps to min(decay, (1 + n) / (10 + n)), so the random start fades fast."""
    elastic: Literal["keep", "adapt"] = "keep"
    """Resuming on another number of processes: keep changes train.grad_accum_steps so that the global batch (and
    the steps per epoch, every step's LR) stay the checkpoint's, and refuses when no whole accumulation does; adapt
    then trains on with the new global batch, the LR schedule rescaled to end at the same epoch."""


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO instead of DDP (install with `pip install -c constraints.txt '.[deepspeed]'`)."""

    enabled: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    """0: plain data parallel; 1: optimizer states sharded; 2: + gradients; 3: + parameters."""
    config_file: str | None = None
    """A DeepSpeed JSON used as the base (its ZeRO stage wins over zero_stage). Its batch-size,
    accumulation and clipping keys must be "auto" or equal to dist_train's own settings."""


@dataclass
class CheckpointConfig:
    """Which checkpoints are kept."""

    monitor: str | None = None
    """The metric that picks `best`, drives early stopping and ReduceLROnPlateau; None: the task's own
    (val_accuracy; regression val_rmse; ranking val_ndcg@k)."""
    mode: Literal["max", "min"] | None = None
    """None: min for losses and errors (val_loss, val_mae, val_mse, val_rmse), max otherwise."""
    keep_last: int = 2
    """Newest checkpoints kept (plus `best`); older ones are deleted once a new one is complete."""
    every_n_steps: int | None = None
    """Also save every this many optimizer steps (in the middle of epochs; resume continues exactly there)."""
    every_n_minutes: float | None = None
    """Also save when this many minutes have passed since the last save (decided by rank 0 for all)."""
    check_every_n_steps: int = 5
    """How often (optimizer steps) the ranks agree on preemption signals and timed saves: one tiny all-reduce."""
    requeue_on_preemption: bool = True
    """Under SLURM, after a preemption save, `scontrol requeue $SLURM_JOB_ID` so that the job resumes."""


@dataclass
class TrackingConfig:
    """What is reported while training (TensorBoard always; train.log_every_n_steps sets the pace)."""

    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the scalars go, besides the run directory: any of tensorboard (always on), mlflow, wandb, comet_ml, aim,
    clearml, dvclive (Accelerate's trackers; each needs its package). Each gets the flattened config as parameters,
    every logged scalar with its step and, at the end, the final metrics."""
    project: str = "dist_train"
    """The experiment (MLflow) or project (the others) the runs are filed under."""
    mlflow_uri: str | None = None
    """The MLflow tracking server, e.g. http://mlflow.internal:5000; None: MLFLOW_TRACKING_URI (else ./mlruns)."""
    mlflow_required: bool = True
    """A tracking server that does not answer at the start is an error (one line); false: a warning, and the run goes
    on without MLflow."""
    images: bool = True
    """Per evaluation: a confusion-matrix figure and a grid of the worst validation mistakes."""
    num_images: int = 16
    """How many of the worst mistakes the grid shows."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install wandb; WANDB_MODE=offline to log without an account): the older
    spelling of tracking.trackers: [tensorboard, wandb]."""
    wandb_project: str = "dist_train"


@dataclass
class InferenceConfig:
    """The submission file."""

    output: str | None = None
    """Submission CSV path; None: <output_dir>/submission.csv."""
    id_column: str = "id"
    label_column: str = "label"
    probabilities: bool = False
    """Also write each class's probability (columns prob_<class>; multihead: of the combined classes)."""
    tta: Literal["none", "hflip"] = "none"
    """Test-time augmentation: hflip averages the predictions of each image and its mirror image."""
    weights: Literal["auto", "model", "ema"] = "auto"
    """Which weights of a checkpoint predict: auto takes the EMA (train.ema_decay) when it has one."""


@dataclass
class CVConfig:
    """K-fold cross-validation over the training table: each fold a run in <output_dir>/fold-<k>, then the
    out-of-fold predictions (oof.csv) and every metric per fold and over all of them (cv_summary.json)."""

    folds: int = 0
    """K folds (grouped by data.group_column, stratified by label where the task has classes); 0: off."""
    fold: int | None = None
    """Train only this fold (0 .. folds - 1), e.g. one task of a SLURM job array; None: every fold in turn."""
    seed: int | None = None
    """Seed of the assignment of rows to folds; None: the run's seed."""


@dataclass
class DistillConfig:
    """Knowledge distillation: the config's model (the student) learns from a trained teacher's outputs too:
    loss = alpha x task loss + (1 - alpha) x T^2 x KL(softmax(teacher / T) || softmax(student / T)), per head for
    multihead. The teacher never trains; it sees the images with its own preprocessing (its config's size, mean, std)."""

    teacher: str | None = None
    """A run directory (its best checkpoint), a checkpoint directory, or a cross-validation run's directory (its folds'
    best, averaged: the fold ensemble); None: no distillation."""
    alpha: float = 0.5
    """The task loss's share: 1 trains on the labels alone, 0 on the teacher alone."""
    temperature: float = 2.0
    """T: teacher and student outputs are softened by softmax(outputs / T) before the KL divergence."""
    tta: Literal["none", "hflip"] = "none"
    """The teacher's test-time augmentation: hflip averages its outputs on each image and its mirror image."""
    live: bool = False
    """False: the teacher's outputs on the training table are computed once before training (sharded inference) and
    cached in the run directory (teacher_logits.safetensors); every epoch reads them. True: the teacher runs on each
    training batch as the student sees it (after crops, flips, mixup): one teacher forward pass per batch and epoch."""
    cv_targets: Literal["fold", "oof"] = "fold"
    """With cv.folds on the student (the teacher must be a cross-validation run of the same folds): fold: student fold k
    learns from teacher fold k, the one model that never saw fold k's rows; oof: from the teacher's oof.csv, each row's
    prediction by the teacher fold that held it out (no teacher inference; those folds did see fold k's rows)."""


def fold_output_dir(output_dir: str | Path, fold: int) -> Path:
    """Where fold `fold` of a cross-validation run in `output_dir` runs: a normal run directory."""
    return Path(output_dir) / f"fold-{fold}"


@dataclass
class Config:
    """A whole run."""

    output_dir: str = "runs/digits"
    """Run directory: config, logs, checkpoints, TensorBoard, submission."""
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
