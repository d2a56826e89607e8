# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
