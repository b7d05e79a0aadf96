"""Models and what trains them: networks by name (torchvision, timm, the built-in small ones, users' files), losses,
tasks (classification, multi-head, regression, ranking: their targets, losses and metrics), metrics, optimizers and
schedules, EMA, BatchNorm handling.

    networks.py        build_model: by name, local pretrained weights, head swap, freezing
    timm_backbones.py  timm models from local weights
    batchnorm.py       SyncBatchNorm conversion, BatchNorm statistics
    ema.py             the weights' exponential moving average
    losses.py          cross-entropy, label smoothing, focal, F1; users' losses
    distill.py         knowledge distillation: the loss against a teacher, its cached outputs
    tasks/             what a task predicts, its loss, its metrics and its submission columns: a module per kind
                       (classification, multihead, multilabel, regression, ranking), base.py, loading.py
    metrics.py         metrics on gathered predictions, each implemented once
    optim.py           parameter groups, optimizers, schedules (warmup, step, cosine, plateau)

May import: config, errors, custom, job, data. Never rundir, loop or commands.
"""
from dist_train.compat import moved_names

OLD_NAMES = {
    "CHECKPOINTED_BLOCKS": "networks",
    "CheckpointedSequential": "networks",
    "MLP": "networks",
    "SmallCNN": "networks",
    "SpatialMean": "networks",
    "build_model": "networks",
    "enable_grad_checkpointing": "networks",
    "freeze": "networks",
    "has_batchnorm": "networks",
    "load_pretrained": "networks",
    "parameter_counts": "networks",
    "pickled_globals": "networks",
    "read_weights": "networks",
    "torchvision_model": "networks",
}
"""What `from dist_train.models import X` found when models was one module (users' files may still say it)."""


def __getattr__(name: str):
    return moved_names(__name__, OLD_NAMES, name)
