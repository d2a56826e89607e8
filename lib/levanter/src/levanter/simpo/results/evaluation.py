# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Held-out evaluation of a SimPO run: the loss and its metrics as exact means over the held-out pairs, the
length diagnostics (``levanter.simpo.results.length_diagnostics``) and the model's own answers
(``levanter.simpo.results.samples``)."""

from typing import Mapping, cast

import haliax as hax
import levanter.tracker
from levanter import callbacks
from levanter.callbacks import StepInfo
from levanter.data.dataset import AsyncDataset
from levanter.data.loader import DataLoader
from levanter.metrics import LossFunctionWithMetrics
from levanter.simpo.results.length_diagnostics import finish_length_diagnostics
from levanter.simpo.results.samples import HeldOutSamples
from levanter.trainer import Trainer


class HeldOutEvaluator:
    """Evaluates the SimPO loss, its metrics and the length diagnostics on held-out pairs, and remembers the
    latest results for the summary."""

    def __init__(
        self,
        trainer: Trainer,
        datasets: Mapping[str, AsyncDataset],
        loss_fn,
        sft_weight: float,
        samples: HeldOutSamples | None = None,
    ):
        # under the trainer's compute mapping, as Levanter's own evaluators jit: on a mesh the batch and the
        # parameters are sharded by it, and a plain jit would meet them with the parameter mapping's specs
        @hax.named_jit(axis_resources=trainer.compute_axis_mapping)
        def eval_loss(model, batch):
            return loss_fn(trainer.mp.cast_to_compute(model), batch, key=None, length_diagnostics=True)

        # named_jit's wrapper has the loss function's call, not the protocol's keyword-only extras
        self._eval_loss = cast(LossFunctionWithMetrics, eval_loss)
        self._sft_weight = sft_weight
        self._loaders: dict[str, DataLoader] = {
            name: trainer.data_loader(ds, trainer.EvalBatch) for name, ds in datasets.items()
        }
        self._max_batches = trainer.config.max_eval_batches
        self._cast = trainer.mp.cast_to_compute
        self.samples = samples
        self._steps_per_eval, self._last_step = trainer.config.steps_per_eval, trainer.config.num_train_steps
        self.latest: dict[str, float] = {}
        self.latest_step: int | None = None

    def __call__(self, info: StepInfo):
        if self.latest_step == info.step:
            return
        results: dict[str, float] = {}
        single = len(self._loaders) == 1
        for name, loader in self._loaders.items():
            _, metrics = callbacks.eval_loss_loop(
                self._eval_loss, info.eval_model, loader, max_batches=self._max_batches, name=name
            )
            prefix = "eval" if single else f"eval/{name}"
            named = {f"{prefix}/{k}": v for k, v in metrics.items() if not k.startswith("eval/")}
            # Levanter's loop averages per-batch losses, which weighs a short last batch's pairs more; the folded
            # metrics are exact means over the held-out pairs (and chosen tokens, for the SFT term)
            named[f"{prefix}/loss"] = named[f"{prefix}/simpo_loss"] + self._sft_weight * named.get(
                f"{prefix}/simpo_sft_loss", 0.0
            )
            results |= finish_length_diagnostics(named, prefix)
        if self.samples is not None and self._samples_at(info.next_step):
            results |= self.samples(self._cast(info.eval_model), info.step)
        levanter.tracker.log(results, step=info.step)
        self.latest, self.latest_step = results, info.step

    def _samples_at(self, next_step: int) -> bool:
        # decided by the step, so that a resumed run samples at the same evaluations; the last one always samples,
        # for the end of the run's summary
        assert self.samples is not None
        evaluation = next_step // self._steps_per_eval
        return evaluation % self.samples.config.every == 0 or next_step >= self._last_step

    def summary(self) -> str:
        def pick(suffix: str) -> str:
            return "  ".join(f"{k} {v:.4f}" for k, v in self.latest.items() if k.endswith(suffix))

        parts = [pick(s) for s in ("rewards/accuracies", "/loss", "rewards/margins", "logps/chosen", "logps/rejected")]
        return f"SimPO held-out metrics at step {self.latest_step}: " + "  ".join(p for p in parts if p)
