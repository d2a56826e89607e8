# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The SimPO objective: ``loss`` (the loss and its metrics) and ``layouts`` (how pairs fill rows, and how each
pair's log-probs come back out)."""
