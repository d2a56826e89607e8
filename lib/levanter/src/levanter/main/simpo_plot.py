# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Draws a SimPO run's picture again from its metric history, and shows two of the newest samples of what its model
writes: ``python -m levanter.main.simpo_plot RUN_DIR`` (``levanter.main.simpo_samples`` shows any step's)."""

import argparse
import sys
from pathlib import Path

from levanter.simpo.results.picture import HISTORY_FILE, draw
from levanter.simpo.results.samples import describe, read_samples, sampled_steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draws a SimPO run's picture from its metric history.")
    parser.add_argument("run_dir", type=Path, help=f"the run's directory, holding its {HISTORY_FILE}")
    args = parser.parse_args(argv)
    try:
        out, drawn = draw(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(drawn)} series)")
    if sampled_steps(args.run_dir):
        step, records = read_samples(args.run_dir)
        print(f"What the model wrote at step {step} (python -m levanter.main.simpo_samples for any step):")
        for record in records[:2]:
            print(describe(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
