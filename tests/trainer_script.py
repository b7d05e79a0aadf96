"""A user's script with dist_train.Trainer, launched like train.py by tests/test_api.py:

    accelerate launch ... tests/trainer_script.py CONFIG key=value ...

Its parts are plain-torch equivalents of the built-in ones the config names (the small CNN, initialised as
build_model does after seeding; torch's cross-entropy; the built-in datasets behind a wrapper), so its
result must be the CLI's, bit for bit. Each rank writes the samples it loaded to <output_dir>/seen-rank<R>.json.
"""
import json
import os
import sys
from pathlib import Path

import yaml
from accelerate.utils import set_seed
from torch import nn
from user_parts import Recorded

from dist_train import Trainer
from dist_train.config import load_config
from dist_train.data.datasets import build_dataset
from dist_train.data.splits import load_test_records
from dist_train.models.networks import SmallCNN
from dist_train.models.tasks import load_records

config_file, overrides = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
values = {key: yaml.safe_load(value) for key, value in overrides.items()}
config = load_config(config_file, values=values)
train_records, val_records, classes = load_records(config.data, config.seed)
test_records = load_test_records(config.data)

set_seed(config.seed)  # the weights build_model draws right after fit() seeds
model = SmallCNN(len(classes), config.data.channels, width=config.model.width)
train = Recorded(build_dataset(train_records, config.data, "train", config.seed), classes)
trainer = Trainer(config_file, model=model, loss=nn.CrossEntropyLoss(label_smoothing=config.loss.label_smoothing),
                  train_dataset=train, val_dataset=Recorded(build_dataset(val_records, config.data, "val", config.seed)),
                  **values)
summary = trainer.fit()
trainer.predict(dataset=Recorded(build_dataset(test_records, config.data, "test", config.seed), ids=test_records.ids))
rank = int(os.environ.get("RANK", "0"))
(Path(config.output_dir) / f"seen-rank{rank}.json").write_text(json.dumps(train.seen))
print(f"rank {rank}: trained {summary['global_step']} steps", flush=True)
