"""Reproduce the paper's comparison: BalPoE and its baselines trained alike, per seed, and
a report of everything measured so far.

    python tools/reproduce.py --flagfile=configs/cifar10_ir100.flags --dataset=folder \\
        --data_path=DIR --run_root=$HOME/repro/cifar10_ir100 [--methods=balpoe,bs,...] [--seeds=1,2,3]

The flags describe the BalPoE run (every flag of tools/train.py); BS, BalPoE without mixup,
CE and the uniform ensemble change only what makes them that method. Runs go one at a time
to RUN_ROOT/seed<S>/<method>, each resuming from its last checkpoint, so starting the same
command again continues an interrupted reproduction; `--notrain` writes the report of what
exists (finished runs in full, unfinished ones with their epoch) to RUN_ROOT/reproduce.{md,json},
with the finished methods' reliability diagrams side by side in RUN_ROOT/reliability.png;
`--summary_json=PATH` also writes the one-row-per-run summary there, keeping the finished rows
it already holds for runs this report lacks (runs reported from another run root or machine).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()

from balpoe_tf import cli, reproduction, run_config, settings  # noqa: E402


if __name__ == "__main__":
    cli.run_tool((run_config.RunConfig, settings.ReproduceConfig), reproduction.reproduce)
