"""The non-finite guard: an optimizer step whose loss or gradient is NaN/Inf on any rank is skipped (or stops
the run) the same way on every rank, mostly without a host sync and, under DDP, without a collective."""
from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dist_train.errors import TrainingError
from dist_train.job.distributed import main_print


class FiniteGuard:
    """Skips every optimizer step whose loss or gradient is NaN/Inf on any rank, the same way on every rank.

    `policy`: skip (every rank skips the step; `max_bad` in a row stop the run), stop (the run stops), or ignore
    (no check at all: the optimizer always steps; the counters a resumed run carries stay as they were).

    The verdict is a flag on the device that every rank computes alike. Under DDP (`via_gradients`) it
    costs no communication of its own: a rank whose loss is not finite scales its backward by NaN
    (`carry`), DDP's gradient all-reduce spreads any NaN/Inf to every rank, and each rank judges the
    all-reduced gradients, which are the same everywhere. Elsewhere (DeepSpeed, FSDP) the local verdicts
    are all-reduced: one small collective per optimizer step. With a fused torch optimizer the verdict never
    leaves the device: it goes to the optimizer as `found_inf` (the protocol torch's GradScaler uses), which
    leaves weights, moments and step count as they were, and the counters stay on the device until `poll`
    reads them (every checkpoint.check_every_n_steps and before each save). Otherwise (other optimizers,
    DeepSpeed, policy stop) each step reads the flag at once: one host sync per optimizer step.

    Its counters are resumable state (`state_dict`): skipped steps in all, and bad steps in a row.
    """

    def __init__(self, accelerator: Accelerator, torch_optimizer: torch.optim.Optimizer, policy: str, max_bad: int,
                 kept: Callable[[], str] = lambda: "", via_gradients: bool = False):
        self.accelerator, self.torch_optimizer, self.policy, self.max_bad, self.kept = accelerator, torch_optimizer, policy, max_bad, kept
        # fp16's GradScaler skips an overflowing step itself (and lowers its scale): only the loss is judged here,
        # all-reduced, and optimizer.step() always runs so that the scaler sees every step
        self.scaled = accelerator.scaler is not None
        self.via_gradients = via_gradients and accelerator.num_processes > 1 and policy != "ignore" and not self.scaled
        self.sync_free = (policy == "skip" and bool(torch_optimizer.defaults.get("fused"))
                          and accelerator.distributed_type != DistributedType.DEEPSPEED and not self.scaled)
        self.load_state_dict({"skipped_steps": 0, "bad_steps_in_a_row": 0})

    def step(self, optimizer, step_loss: torch.Tensor, grad_norm, step: int) -> torch.Tensor | None:
        """optimizer.step() unless optimizer step number `step` is bad; returns the 0-d bool verdict (None: unchecked)."""
        if self.policy == "ignore":
            optimizer.step()
            return None
        bad = self._verdict(step_loss, grad_norm)
        flag = bad.to(torch.float32)  # exactly 1.0 or 0.0: the fused kernels skip on found_inf == 1 only
        counts, hit = self.counts, bad.long()
        counts[0] += hit
        counts[1] = (counts[1] + 1) * hit
        counts[2] = torch.where((counts[1] >= self.max_bad) & (counts[2] == 0), step, counts[2])
        counts[3] = torch.where(bad, step, counts[3])
        if self.sync_free:
            self.torch_optimizer.found_inf, self.torch_optimizer.grad_scale = flag, None
            try:
                optimizer.step()
            finally:
                del self.torch_optimizer.found_inf, self.torch_optimizer.grad_scale
        elif not self.poll(step) or self.scaled:
            optimizer.step()
        return bad

    def _verdict(self, step_loss: torch.Tensor, grad_norm) -> torch.Tensor:
        """Whether this step is bad on any rank: the same 0-d bool tensor on every rank."""
        if self.via_gradients:  # the all-reduced gradients carry every rank's verdict (see carry)
            if grad_norm is None:
                grads = [p.grad for group in self.torch_optimizer.param_groups for p in group["params"] if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=step_loss.device)
            return ~torch.isfinite(torch.as_tensor(grad_norm, device=step_loss.device))
        bad = ~torch.isfinite(step_loss)
        if grad_norm is not None and not self.scaled:  # a scaled gradient overflows now and then: the scaler's business
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=step_loss.device))
        if self.accelerator.num_processes > 1:  # the one collective of the guard, where gradients cannot carry it
            flag = bad.to(torch.float32).reshape(1)
            torch.distributed.all_reduce(flag)
            bad = flag[0] > 0
        return bad

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: itself (times exactly 1.0) when finite; times NaN when not, which makes
        every gradient it reaches NaN, and DDP's all-reduce then tells every rank. (A non-finite loss alone
        need not make the gradients so: a constant NaN term, or an Inf cross-entropy with label smoothing.)"""
        if not self.via_gradients:
            return loss
        return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))

    def poll(self, step: int) -> bool:
        """Reads the counters: warns about skipped steps, raises TrainingError when the policy says stop.
        Returns whether the newest step was bad."""
        if self.policy == "ignore":
            return False
        skipped, self.in_a_row, run_end, last_bad = self.counts.tolist()
        new, self.skipped = skipped - self.skipped, skipped
        if not new:
            return False
        if self.policy == "stop":
            raise TrainingError(f"step {last_bad}: the loss or gradient is not finite on some rank (train.nonfinite=stop); "
                                f"stopped. {self.kept()}")
        if run_end:
            raise TrainingError(f"steps {run_end - self.max_bad + 1}-{run_end}: {self.max_bad} optimizer steps in a row had a "
                                f"non-finite loss or gradient (train.max_bad_steps={self.max_bad}); stopped at step {step}. "
                                f"{self.kept()}")
        which = f"step {last_bad}" if new == 1 else f"{new} steps up to step {last_bad}"
        main_print(self.accelerator, f"warning: {which}: non-finite loss or gradient on some rank; every rank skipped it "
                                     f"({self.in_a_row} in a row, {skipped} in all)")
        return last_bad == step

    def state_dict(self) -> dict:
        skipped, in_a_row = self.counts[:2].tolist()
        return {"skipped_steps": skipped, "bad_steps_in_a_row": in_a_row}

    def load_state_dict(self, state: dict) -> None:
        skipped, in_a_row = int(state["skipped_steps"]), int(state["bad_steps_in_a_row"])
        # skipped in all, bad steps in a row, the step at which a run of max_bad ended, the last bad step
        self.counts = torch.tensor([skipped, in_a_row, 0, 0], dtype=torch.int64, device=self.accelerator.device)
        self.skipped, self.in_a_row = skipped, in_a_row
