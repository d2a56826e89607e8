# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Draws a SimPO run's picture again from its metric history: ``python -m levanter.main.simpo_plot RUN_DIR``."""

import argparse
import sys
from pathlib import Path

from levanter.simpo.results.picture import HISTORY_FILE, draw


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
