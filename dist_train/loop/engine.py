"""The loop: a Run trains epoch by epoch over built Parts -- micro-steps, optimizer steps, the step policy,
evaluation, the epoch's end -- deciding through policy.py's rules and communicating through ranks.Ranks."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from dist_train.config import to_dict
from dist_train.job import faults
from dist_train.job.distributed import same_on_all_ranks, unwrap
from dist_train.job.faults import Preempted, SignalFlag, Watchdog
from dist_train.loop.build import Parts
from dist_train.loop.policy import EvalRules, StepRules
from dist_train.loop.ranks import Ranks, check_each_once
from dist_train.loop.state import Epoch, EpochResult, EpochTotals, MicroBatch, RunState
from dist_train.rundir.checkpoint import Checkpointer, Resumable, checkpoint_name
from dist_train.rundir.report import Reporter, bars, describe_run, epoch_line, progress, step_line


class Run:
    """One training run over built Parts: epochs of train + evaluate from where the run stands, checkpoints
    through a Checkpointer, decisions through the pure rules of policy.py, output through a Reporter.

        run = Run(accelerator, build_parts(accelerator, config))
        run.start()                # or run.start(checkpoint.choose_checkpoint(accelerator, "auto", checkpoints))
        summary = run.train()

    `watchdog` and `signals` (faults.py) see the run's progress and its preemption signals; left out, none. `judge`
    (a search's pruner) is asked on the main process after each evaluation, `judge(epoch, metrics)`: True ends the run
    there, on every rank (the main process's answer is broadcast).
    """

    def __init__(self, accelerator: Accelerator, parts: Parts, watchdog: Watchdog | None = None,
                 signals: SignalFlag | None = None, started: float | None = None, judge=None):
        config = parts.config
        self.accelerator, self.parts, self.config, self.layout = accelerator, parts, config, parts.layout
        self.state = RunState(layout=self.layout.as_list())
        self.ranks = Ranks(accelerator)
        self.step_rules = StepRules.of(config.train, config.checkpoint, self.layout.batches_per_process)
        self.eval_rules = EvalRules.of(config.train, config.checkpoint)
        self.config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False)
        output_dir = Path(config.output_dir)
        self.checkpointer = Checkpointer(accelerator, output_dir / "checkpoints", parts.model,
                                         Resumable(self.state, parts.schedule, parts.guard, parts.ema),
                                         layout=self.layout.as_list(), config_yaml=self.config_yaml,
                                         classes=parts.labels, keep_last=config.checkpoint.keep_last)
        self.reporter = Reporter(accelerator, config, output_dir)
        self.watchdog = watchdog or Watchdog(config.train.distributed_timeout_s, 1)
        self.signals = signals or SignalFlag(signals=())
        self.started = started if started is not None else time.time()
        self.last_save = time.monotonic()
        self.last_step_line = -float("inf")  # (time.perf_counter of the last step line printed)
        self.judge = judge
        self.info: dict = {}

    def start(self, checkpoint: Path | None = None) -> None:
        """Resume from `checkpoint` when given (under another layout as the parts' resumption says), then open the run
        directory's records (config.yaml, run_info.json, metrics.jsonl, TensorBoard) and say what runs."""
        resumption = self.parts.resumption
        if checkpoint is not None:
            self.checkpointer.resume(checkpoint, rescale=resumption is not None and resumption.rescale)
            if resumption is not None and resumption.changed:  # (mid-epoch: its batches done counted in this layout)
                line, self.state.batches_done = resumption.resumed(self.layout.samples, self.state.epoch, self.state.batches_done)
                self.accelerator.step = 0  # the saved micro-batch count is the old accumulation's: a window starts here
                self.reporter.say(line)
            self.reporter.say(f"resumed from {checkpoint}: epoch {self.state.epoch + 1}, batch {self.state.batches_done}, "
                              f"step {self.state.global_step}")
        self.info = describe_run(self.accelerator, self.parts, self.ranks.gather_processes(), checkpoint, self.started)
        self.reporter.start(self.info, self.config_yaml, self.state.global_step if checkpoint is not None else None,
                            self.parts.model_name)

    def train(self) -> dict:
        """Epochs of train + evaluate from where the run stands; returns the summary (run_info.json)."""
        stop = None
        for index in range(self.state.epoch, self.config.train.epochs):
            if not self.eval_rules.starts_epoch(self.state.global_step):
                break
            result = self.train_epoch(index)
            metrics, outputs = self.evaluate()
            stop = self.end_epoch(result, metrics, outputs)
            if stop is not None:
                break
        if stop == "pruned":
            self.info["pruned_after_epoch"] = self.state.epoch
        return self.finish(stopped_early=stop == "patience")

    # --- one epoch of training -----------------------------------------------------------------

    def train_epoch(self, index: int) -> EpochResult:
        """One pass over this process's shard of epoch `index` (from 0), from where a resume left it."""
        epoch = self._begin_epoch(index)
        self.parts.model.train()
        try:
            for micro in range(epoch.first_batch, self.layout.batches_per_process):
                batch = epoch.next_batch()
                if batch is None:
                    break
                self.watchdog.beat()
                if self.micro_step(self._micro_batch(batch, micro, epoch), epoch) and self.after_step(epoch):
                    epoch.loader.end()  # leaving the loop early: unregister it from Accelerate's gradient state
                    break
        except BaseException:
            epoch.bar.close()  # (the error's line then starts a line of its own, not the bar's)
            raise
        return self._end_training(epoch)

    def micro_step(self, micro: MicroBatch, epoch: Epoch) -> bool:
        """Forward and backward of one micro-batch; the optimizer step when it ends an accumulation window.
        Returns whether it did. Each step follows the gradient of the mean loss over the real samples of its
        window, all ranks together: N processes x batch b x accumulation A step as 1 process with batch N*b*A."""
        model, accelerator = self.parts.model, self.accelerator
        # accumulate() turns off DDP's gradient all-reduce on all but the last micro-batch of each window
        # (and always syncs at the end of the loader, so no gradient leaks into the next epoch).
        with accelerator.accumulate(model):
            logits = model(micro.images)
            self.watchdog.beat()
            loss_sum = self._real_loss_sum(logits, micro)
            # backward() divides by grad_accum_steps and DDP averages over ranks: undo both, and divide
            # once by the window's real sample count.
            accelerator.backward(loss_sum * (self.layout.accum * self.layout.processes / micro.window_samples))
            epoch.step_loss += loss_sum.detach().double()
            epoch.count(micro)
            stepped = accelerator.sync_gradients
            if stepped:
                self.optimizer_step(epoch)
        faults.inject(f"batch:{(epoch.number - 1) * self.layout.batches_per_process + micro.index + 1}")
        return stepped

    def optimizer_step(self, epoch: Epoch) -> None:
        """Clip, step (unless the guard finds the step non-finite on some rank), zero the gradients, schedule."""
        parts, accelerator, max_norm = self.parts, self.accelerator, self.config.train.max_grad_norm
        epoch.grad_norm = accelerator.clip_grad_norm_(parts.model.parameters(), max_norm) if max_norm is not None else None
        bad = parts.guard.step(parts.optimizer, epoch.step_loss, epoch.grad_norm, self.state.global_step + 1)
        parts.optimizer.zero_grad(set_to_none=True)
        if not accelerator.optimizer_step_was_skipped:
            parts.schedule.step()  # a step skipped as non-finite still counts: the LR follows the step count
        self.state.global_step += 1
        epoch.add_step(bad)

    def after_step(self, epoch: Epoch) -> bool:
        """After an optimizer step: the log, the EMA, then the step policy -- a periodic, timed or preemption save.
        Returns True to end the epoch here (train.max_steps)."""
        self._log_step(epoch)
        self.watchdog.beat()
        step, self.state.batches_done = self.state.global_step, epoch.local_batches
        if self.parts.ema is not None:
            self.parts.ema.update(unwrap(self.accelerator, self.parts.model))
        preempted = timed = False
        if self.step_rules.checks_at(step):
            self.parts.guard.poll(step)
            timed_due = self.accelerator.is_main_process and self.step_rules.timed_save_due(time.monotonic() - self.last_save)
            preempted, timed = self.ranks.agree_on_signals(self.signals.received is not None, timed_due)
        decision = self.step_rules.after_step(step, epoch.local_batches, preempted, timed)
        if decision.save:
            self.state.epoch_totals = self.ranks.sum_epoch_totals(epoch.totals.values)
            path = self.save()
            if decision.preempt:
                raise Preempted(f"a preemption signal reached the job; saved {path} at step {step}")
        faults.inject(f"step:{step}")
        return decision.end_epoch

    def _begin_epoch(self, index: int) -> Epoch:
        """Epoch `index`'s shuffle and augmentation seeds, its loader (past the batches a resumed run already did)
        and its counters (on rank 0, the totals a mid-epoch checkpoint carried)."""
        parts, state = self.parts, self.state
        parts.train_loader.set_epoch(index)
        parts.train_set.set_epoch(index)
        first, state.batches_done = state.batches_done, 0
        carried = state.epoch_totals if first and self.accelerator.is_main_process else None
        totals, state.epoch_totals = EpochTotals(self.accelerator.device, carried), []
        loader = self.accelerator.skip_first_batches(parts.train_loader, first) if first else parts.train_loader
        if first:
            loader.set_epoch(index)
        return Epoch(number=index + 1, first_batch=first, loader=loader, bar=progress(loader, f"epoch {index + 1}", self.accelerator),
                     totals=totals, step_loss=torch.zeros((), dtype=torch.float64, device=self.accelerator.device),
                     local_batches=first, local_samples=first * self.layout.batch_size)  # batches before a resume were full

    def _micro_batch(self, batch, index: int, epoch: Epoch) -> MicroBatch:
        """The model's input (data.ModelInput), unreadable images weighed out, mixup/CutMix, the teacher's outputs."""
        images, targets, rows = batch
        images, targets = self.parts.prepare_input(images, targets)
        real = self.layout.real_rows(index, len(targets), self.accelerator.process_index)
        faults.log_rows(epoch.number, self.state.global_step + 1, rows[:real])
        readable = None
        if self.config.data.bad_samples == "skip":  # unreadable images arrive as blanks with target BAD_TARGET
            readable = targets >= 0
            epoch.totals.values[2] += (~readable[:real]).sum()
            targets = targets.clamp(min=0)
        if self.parts.mix is not None:
            images, targets = self.parts.mix(images, targets, epoch.number, index)
        teacher = self.parts.distill.targets(rows, images) if self.parts.distill is not None else None
        return MicroBatch(index, images, targets, real, self.layout.window_samples(index), readable, teacher)

    def _real_loss_sum(self, logits: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        """The summed loss of the micro-batch's real, readable rows (with the test-only injected NaNs); with a teacher,
        each row's task loss mixed with its distillation term (models/distill.py)."""
        per_sample = self.parts.loss_fn(logits, micro.targets)
        if micro.teacher is not None:
            per_sample = self.parts.distill.loss(per_sample, logits, micro.teacher)
        if micro.readable is not None:
            per_sample = per_sample * micro.readable
        loss_sum = per_sample[:micro.real].sum()
        if faults.planned("nan", f"step:{self.state.global_step + 1}"):  # a NaN loss and gradient
            loss_sum = loss_sum * float("nan")
        if faults.planned("nanloss", f"step:{self.state.global_step + 1}"):  # a NaN loss whose gradient is finite
            loss_sum = loss_sum + float("nan")
        return self.parts.guard.carry(loss_sum)

    def _log_step(self, epoch: Epoch) -> None:
        """Every train.log_every_n_steps: the step's loss (all ranks), LR, samples/s and gradient norm to TensorBoard."""
        step = self.state.global_step
        if step % self.config.train.log_every_n_steps == 0:
            now = time.perf_counter()
            values = {"train/loss": self.ranks.mean_step_loss(epoch.step_loss, epoch.step_count),
                      "train/lr": self.parts.schedule.lr(), **self.parts.schedule.group_lrs(),
                      "train/samples_per_sec": epoch.window_samples * self.layout.processes / max(now - epoch.window_start, 1e-9)}
            if epoch.grad_norm is not None:
                values["train/grad_norm"] = float(epoch.grad_norm)
            self.reporter.scalars(values, step)
            epoch.window_start, epoch.window_samples = now, 0
            self._say_step(epoch, values, now)
            # shown at the bar's next redraw (refreshing now would print a stale count into log files)
            epoch.bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}", refresh=False)
        epoch.step_loss.zero_()
        epoch.step_count = 0

    def _say_step(self, epoch: Epoch, values: dict, now: float) -> None:
        """Output not a terminal: the step's line (at most every train.log_every_n_seconds), flushed; the ETA from this
        epoch's pace so far (evaluations not counted)."""
        every = self.config.train.log_every_n_seconds
        if bars() or (every is not None and now - self.last_step_line < every):
            return
        self.last_step_line = now
        per_epoch = self.layout.batches_per_process
        done = max(epoch.local_batches - epoch.first_batch, 1)
        per_batch = (now - epoch.started) / done
        epoch_left = (per_epoch - epoch.local_batches) * per_batch
        total = self.layout.total_steps(self.config.train.epochs, self.config.train.max_steps)
        run_left = (total - self.state.global_step) * self.config.train.grad_accum_steps * per_batch
        self.reporter.say(step_line(self.state.global_step, total, epoch.number, self.config.train.epochs,
                                    epoch.local_batches / max(per_epoch, 1), values, epoch_left, run_left))

    def _end_training(self, epoch: Epoch) -> EpochResult:
        """The epoch's training figures, all ranks."""
        epoch.bar.close()
        loss, real_samples, skipped = self.ranks.sum_epoch_totals(epoch.totals.values)
        seconds = time.perf_counter() - epoch.started
        self.parts.guard.poll(self.state.global_step)
        return EpochResult(train_loss=loss / max(real_samples, 1), samples=int(real_samples), local_samples=epoch.local_samples,
                           local_batches=epoch.local_batches, seconds=seconds, skipped_samples=int(skipped),
                           data_seconds=epoch.data_seconds)

    # --- evaluation and the epoch's end ----------------------------------------------------------

    def evaluate(self) -> tuple[dict, dict]:
        """The validation split through the model (its EMA when kept), sharded, gathered: (metrics, outputs)."""
        parts = self.parts
        self.ranks.share_buffers(parts.model, parts.ema)
        model = parts.ema.module if parts.ema is not None else parts.model
        outputs = self.ranks.gather_predictions(model, parts.val_loader, parts.loss_fn, parts.prepare_input, self.watchdog.beat)
        check_each_once(outputs["indices"], len(parts.val_set), "validation")
        groups = parts.val_groups[outputs["indices"]] if parts.val_groups is not None else None
        metrics = parts.task.metrics(outputs["logits"], outputs["targets"], outputs["losses"], groups)
        return self.ranks.rank0_metrics(metrics), outputs

    def end_epoch(self, result: EpochResult, metrics: dict, outputs: dict) -> str | None:
        """Decide (improved? stop?), record, save (`best` when improved), say so; why the run stops after it, or None."""
        state, monitor = self.state, self.config.checkpoint.monitor
        lr = self.parts.schedule.lr()
        self.parts.schedule.step_metric(metrics[monitor])
        decision = self.eval_rules.after_evaluation(metrics[monitor], state.best_metric, state.evals_without_improvement,
                                                    state.epoch + 1, state.global_step)
        state.epoch, state.batches_done = state.epoch + 1, 0
        state.skipped_samples += result.skipped_samples
        state.evals_without_improvement = decision.evals_without_improvement
        if decision.improved:
            state.best_metric, state.best_epoch = metrics[monitor], state.epoch
            state.best_checkpoint = checkpoint_name(state.global_step)
        record = self._epoch_record(result, metrics, lr)
        self.reporter.epoch(record, metrics, state.global_step)
        if self.parts.task.kind == "classification":
            self.reporter.figures(state.global_step, metrics, self.parts.labels, self.parts.val_set, outputs)
        if self.parts.task.kind == "multilabel":
            state.thresholds = metrics["thresholds"] if self.config.task.threshold == "tune" else None
            self.reporter.scalars({f"val_ap/{name}": ap for name, ap in zip(self.parts.task.class_names, metrics["per_class_ap"])
                                   if ap is not None}, state.global_step)
        if result.skipped_samples:
            self.reporter.say(f"epoch {state.epoch}: skipped {result.skipped_samples} unreadable training images "
                              f"(data.bad_samples=skip; {state.skipped_samples} in all)")
        faults.inject(f"evaluated:{state.global_step}")  # (recorded, not yet saved)
        path = self.save(best=decision.improved)
        faults.inject(f"epoch:{state.epoch}")
        if self.ranks.any_preempted(self.signals.received is not None):  # e.g. a signal during validation
            raise Preempted(f"a preemption signal reached the job; saved {path} at step {state.global_step}")
        self.reporter.say(epoch_line(self.config, self.parts.task.headline(), record, metrics, decision.improved))
        if decision.stop == "max_steps":
            self.reporter.say(f"reached train.max_steps={self.config.train.max_steps}")
        elif decision.stop == "patience":
            self.reporter.say(f"early stop: {monitor} did not improve for {self.config.train.early_stopping_patience} evaluations")
        if self.judge is not None:  # asked after every epoch (it records the score); it can only stop one before the last
            verdict = self.judge(state.epoch, metrics) if self.accelerator.is_main_process else None
            if same_on_all_ranks(self.accelerator, verdict) and decision.stop is None and state.epoch < self.config.train.epochs:
                self.reporter.say(f"pruned after epoch {state.epoch}: the search stops this trial")
                return "pruned"
        return decision.stop

    def _epoch_record(self, result: EpochResult, metrics: dict, lr: float) -> dict:
        """The epoch's line of metrics.jsonl (and the run state's record of what each rank trained on)."""
        shards = self.ranks.gather_shards(result.local_batches, result.local_samples)
        record = {
            "epoch": self.state.epoch,
            "step": self.state.global_step,
            **{k: v for k, v in metrics.items() if k.startswith("val_")},
            "train_loss": result.train_loss,
            "lr": lr,
            "samples_per_sec": result.samples / max(result.seconds, 1e-9),
            "epoch_seconds": result.seconds,
            "data_wait_fraction": result.data_seconds / max(result.seconds, 1e-9),
            "skipped_steps": self.parts.guard.skipped,
            "skipped_samples": result.skipped_samples,
            "rank_batches": [b for _, b, _ in shards],
            "rank_samples": [s for _, _, s in shards],
        }
        self.state.history.append({k: record[k] for k in ("epoch", "rank_batches", "rank_samples")})
        return record

    def save(self, best: bool = False) -> Path:
        """A checkpoint of the run as it stands; the guard's counters are read first (the guard may stop the run)."""
        self.parts.guard.poll(self.state.global_step)
        self.watchdog.beat()
        path = self.checkpointer.save(best)
        self.watchdog.beat()
        self.last_save = time.monotonic()
        return path

    def finish(self, stopped_early: bool) -> dict:
        """The run's summary (run_info.json completed): where it ended, the best metric, each rank's final digests."""
        parts, state = self.parts, self.state
        digests, optimizer_digests = self.ranks.gather_digests(parts.model, parts.torch_optimizer, self.config.deepspeed.enabled)
        summary = {
            **self.info,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": time.time() - self.started,
            "epochs_completed": state.epoch,
            "global_step": state.global_step,
            "stopped_early": stopped_early,
            "best": {"metric": self.config.checkpoint.monitor, "value": state.best_metric, "epoch": state.best_epoch,
                     "checkpoint": state.best_checkpoint},
            "skipped_steps": parts.guard.skipped,
            "skipped_samples": state.skipped_samples,
            "final_weights_sha256_per_rank": digests,
            "final_optimizer_sha256_per_rank": optimizer_digests,
        }
        self.reporter.finish(summary, state.best_metric)
        return summary
