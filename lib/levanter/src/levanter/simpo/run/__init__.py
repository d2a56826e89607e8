# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""One SimPO run's lifecycle around Levanter's trainer: ``lifecycle`` (start checks, no-op reruns, clean exit),
``lease`` (one writer per checkpoint directory), ``preemption`` (SIGTERM stops at a step boundary),
``checkpoints`` (records, checksums and verified resume), ``divergence`` and ``nonfinite`` (the guards that stop a
run), ``compilation_cache`` (the persistent JAX cache) and ``tags`` (W&B runs are tagged ``dpo``, never ``simpo``)."""
