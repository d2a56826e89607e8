# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Shows what a SimPO run's model wrote at an evaluation, finished or running:
``python -m levanter.main.simpo_samples RUN_DIR [--step N] [--count K]``."""

import argparse
import sys
from pathlib import Path

from levanter.simpo.results.samples import describe, read_samples, sampled_steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Shows the answers a SimPO run's model wrote at its evaluations.")
    parser.add_argument("run_dir", type=Path, help="the run's directory, <trainer.log_dir>/<run id>")
    parser.add_argument("--step", type=int, default=None, help="the evaluation's step (default: the newest)")
    parser.add_argument("--count", type=int, default=None, help="show this many samples (default: all)")
    args = parser.parse_args(argv)
    try:
        step, records = read_samples(args.run_dir, args.step)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = records if args.count is None else records[: args.count]
    steps = ", ".join(str(s) for s in sampled_steps(args.run_dir))
    print(f"{len(shown)} of the {len(records)} samples of step {step} (steps with samples: {steps})")
    for record in shown:
        print(describe(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
