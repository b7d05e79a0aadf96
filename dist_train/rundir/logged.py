"""What a killed run's trackers already hold from its checkpoint's step on, read back when the run resumes, so that the
resumed run logs each (metric, step) exactly once: TensorBoard's event files, the MLflow server's metric histories,
W&B's run (its offline files, or its history on the server).

A resume replays the steps after its checkpoint, and at the checkpoint's own step the evaluation when the checkpoint
was taken before it (a save at an epoch's last step, a preemption at the epoch's end). What the killed run logged is
decided per metric and step: a value is dropped only where that metric already has a value at that step.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path


class Held:
    """The (metric, step) pairs one tracker holds at or past the checkpoint's step."""

    def __init__(self, name: str, pairs=(), resumed_at: int = 0):
        self.name, self.pairs, self.resumed_at = name, set(pairs), resumed_at
        self.restored: set[tuple[str, int]] = set()
        """Pairs this run logged again at its start because the tracker had lost them (W&B, from TensorBoard's record)."""

    def fresh(self, values: dict, step: int | None) -> dict:
        """`values` less those the tracker holds at `step`."""
        if step is None or not (self.pairs or self.restored):
            return values
        return {k: v for k, v in values.items() if not self.holds(k, step)}

    def holds(self, tag: str, step: int) -> bool:
        return (tag, step) in self.pairs or (tag, step) in self.restored

    def line(self) -> str | None:
        """The resume's line naming what the killed run logged past its checkpoint, kept rather than logged again:
        the steps after it, and at its step what the training step itself did not log (the evaluation)."""
        past = [(k, s) for k, s in self.pairs if s > self.resumed_at or (s == self.resumed_at and not step_metric(k))]
        if not past:
            return None
        steps = sorted({s for _, s in past})
        where = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        return f"{self.name}: {len(past)} values the killed run logged for {where} are kept, not logged again"


def step_metric(key: str) -> bool:
    """A value the optimizer step logs (its loss, LR, speed, gradient norm), before the step's checkpoint is saved."""
    return key.startswith("train/") and key != "train/epoch_loss"


def tensorboard_held(directory: Path, from_step: int) -> dict[tuple[str, int], float | None]:
    """{(tag, step): value} of the summaries TensorBoard shows in `directory` at steps >= from_step (a scalar's value,
    None for other summaries): the event files in the order they were written, a SessionLog.START (a resumed writer's
    purge_step) hiding what earlier files logged at and past its step, as TensorBoard's own reader does."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from tensorboard.util.tensor_util import make_ndarray

    held: dict[tuple[str, int], float | None] = {}
    for file in sorted(Path(directory).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(file)).Load():  # (scalars come migrated to the scalars plugin's tensors)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                held = {(tag, step): v for (tag, step), v in held.items() if step < event.step}
            elif event.HasField("summary") and event.step >= from_step:
                for value in event.summary.value:
                    scalar = value.metadata.plugin_data.plugin_name == "scalars" and value.HasField("tensor")
                    held[value.tag, event.step] = float(make_ndarray(value.tensor).item()) if scalar else None
    return held


def mlflow_held(client, run_id: str, from_step: int) -> set[tuple[str, int]]:
    """(metric, step) of an MLflow run's histories at steps >= from_step (the server's record is the truth)."""
    held = set()
    for key in client.get_run(run_id).data.metrics:
        held.update((key, m.step) for m in client.get_metric_history(run_id, key) if m.step >= from_step)
    return held


WANDB_STEP = "global_step"
"""The x-axis of every W&B chart (define_metric's step_metric): W&B's own `_step` only counts rows, so a resumed run's
evaluation at its checkpoint's step is never refused as a step going backwards."""


def wandb_held(run, run_dir: Path, from_step: int) -> set[tuple[str, int]]:
    """(metric, global step) the W&B run `run` (just resumed) holds at steps >= from_step: offline, from the files of the
    earlier offline runs of the same id in the run directory; online, its history on the server."""
    if run.offline:
        rows = []
        for folder in sorted((Path(run_dir) / "wandb").glob(f"offline-run-*-{run.id}")):
            if Path(folder).resolve() != Path(run.dir).parent.resolve():
                rows += [row for path in folder.glob("run-*.wandb") for row in wandb_history(path)]
    else:
        import wandb

        rows = wandb.Api().run(f"{run.entity}/{run.project}/{run.id}").scan_history()
    held = set()
    for row in rows:
        step = row.get(WANDB_STEP, row.get("_step"))  # (runs from before global_step was logged: _step was the step)
        if isinstance(step, (int, float)) and step >= from_step:
            held.update((k, int(step)) for k in row if not k.startswith("_") and k != WANDB_STEP)
    return held


def wandb_history(path: Path):
    """The history rows of a .wandb file, as dicts. The file is a LevelDB-style log (a 7-byte header, 32 KiB blocks of
    chunks, each with a 7-byte header: crc, length, type) of wandb_internal_pb2.Record messages; wandb ships no reader
    of its own (0.31). A record cut short by a kill ends the rows."""
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            yield {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def wandb_records(path: Path):
    """The Record messages of a .wandb file (see wandb_history)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError:
                return
            yield record
            pending = b""
