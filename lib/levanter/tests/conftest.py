# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
import os

# Tests never reach the Hugging Face Hub; offline mode skips the retries an HF export would otherwise make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
