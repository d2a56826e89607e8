# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""SimPO on Levanter's trainer: the library behind ``levanter.main.train_simpo``.

- ``objective``: the loss (``loss``) and the pair layouts that turn a batch of rows into per-pair log-probs
  (``layouts``);
- ``run``: one run's lifecycle around the trainer: the lifecycle itself (``lifecycle``), the checkpoint lease
  (``lease``), preemption (``preemption``), checkpoint records and verified resume (``checkpoints``), the
  divergence and non-finite guards (``divergence``, ``nonfinite``), the compilation cache
  (``compilation_cache``) and the run tags (``tags``);
- ``results``: what a run shows and leaves: held-out evaluation (``evaluation``), length diagnostics
  (``length_diagnostics``), the run picture (``picture``) and what an HF export carries (``export``).

The pair data pipeline is ``levanter.data.simpo``.
"""
