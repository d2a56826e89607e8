# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""SimPO's preference pair pipeline on Levanter's data stack, in the order data flows through it.

Building the cache (once per source, by Levanter's cache builder):
- ``sources``: reading the configured files, naming bad lines;
- ``prompt_completion``: the ``preference_prompt_completion`` format and its batch processor;
- ``rows``: checks on raw rows (errors naming row and field, counted drops);
- ``chat_render``: the chat template applied once per batch;
- ``truncation``: the reference trainer's cuts of over-long pairs;
- ``pair_build``: one row to one cached pair (``|y|``, checks, cuts, drops);
- ``cache_identity``: which sources a cache was built from;
- ``stats``: pair statistics.

Serving it (per run):
- ``cache``: opening a built cache;
- ``splits``: held-out pairs, mixtures and the rows of each split;
- ``packing``: several pairs a row pair (first-fit decreasing);
- ``shared_prompt``: the prompt once, then both completions, in one row.
"""
