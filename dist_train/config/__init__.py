"""The run's configuration, the base every other package imports: `from dist_train.config import Config, load_config`.

    sections.py    the typed sections (dataclasses): every key, its default and a one-line doc
    data.py        the data section (its own module: the largest)
    parse.py       YAML/JSON and dotted overrides -> Config (unknown keys named), and back to YAML
    search.py      the hpo section: a hyper-parameter search and its space
    checks.py      cross-field validation; what a config leaves to be chosen (preprocessing, monitor); the hpo space
    pretrained.py  timm's pretrained_cfg of local weights (the input they expect)

May import: errors only (timm, lazily, for a timm model's pretrained_cfg; torchvision, lazily, for a model name).
"""
from dist_train.config.checks import (  # noqa: F401
    CLASSIFICATION_METRICS,
    DEFAULT_PREPROCESSING,
    LOWER_IS_BETTER,
    MODEL_SHAPING,
    check_model_name,
    check_space,
    hpo_objective,
    in_space,
    mode_of,
    model_shaping_differences,
    monitorable,
    preprocessing,
    preprocessing_summary,
    resolve,
    resolve_preprocessing,
    space_value,
    validate,
    validate_splits,
)
from dist_train.config.parse import (  # noqa: F401
    config_from_dict,
    load_config,
    save_config,
)
from dist_train.config.search import HPOConfig, SearchDimension  # noqa: F401
from dist_train.config.sections import (  # noqa: F401
    CheckpointConfig,
    Config,
    CVConfig,
    DataConfig,
    DeepSpeedConfig,
    DistillConfig,
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
