# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What a SimPO run shows and leaves behind: ``evaluation`` (held-out metrics), ``length_diagnostics`` (length
bias), ``picture`` (the metric history and its PNG) and ``export`` (the chat template and stop tokens of an HF
export)."""
