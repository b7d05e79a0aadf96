"""The run's configuration, the base every other package imports: `from dist_train.config import Config, load_config`.

    sections.py    the typed sections (dataclasses): every key, its default and a one-line doc
    parse.py       YAML/JSON and dotted overrides -> Config (unknown keys named), and back to YAML
    checks.py      cross-field validation; what a config leaves to be chosen (preprocessing, monitor)
    pretrained.py  timm's pretrained_cfg of local weights (the input they expect)

May import: errors only (timm, lazily, for a timm model's pretrained_cfg).
"""
from dist_train.config.checks import (  # noqa: F401
    CLASSIFICATION_METRICS,
    DEFAULT_PREPROCESSING,
    LOWER_IS_BETTER,
    MODEL_SHAPING,
    mode_of,
    model_shaping_differences,
    monitorable,
    preprocessing,
    preprocessing_summary,
    resolve,
    resolve_preprocessing,
    validate,
    validate_splits,
)
from dist_train.config.parse import (  # noqa: F401
    config_from_dict,
    load_config,
    save_config,
)
from dist_train.config.sections import (  # noqa: F401
    CheckpointConfig,
    Config,
    CVConfig,
    DataConfig,
    DeepSpeedConfig,
    HeadConfig,
    InferenceConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SchedulerConfig,
    SplitConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
    flatten,
    fold_output_dir,
    to_dict,
)
