# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""One step's loss, metrics and gradients through the trainer, split into microbatches or not, for
``test_simpo_accumulation.py``; run as a script (``python simpo_accumulation_check.py TMP OUT.json``) it makes the
same comparisons on however many devices the process has (the test starts it with four virtual CPU devices).

The rows are a layout's first training rows of the tiny subset, laid out by ``build_preference_splits`` as a run
lays them out; the gradients and loss come from the trainer's own microbatched gradient computation
(``Trainer._compute_gradients_microbatched``, what its train step calls), for ``SimpoTrainer`` and, to show what
the shares correct, for Levanter's plain ``Trainer``.
"""

import contextlib
import functools
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jrandom
import jmp
import numpy as np
import optax

import haliax as hax
from haliax import Axis
from levanter.data.simpo.splits import build_preference_splits
from levanter.main.train_simpo import simpo_loss
from levanter.models.gpt2 import Gpt2Config
from levanter.simpo.objective.accumulation import SimpoTrainer
from levanter.simpo.objective.layouts import pair_layout
from levanter.tracker import NoopConfig
from levanter.trainer import Trainer, TrainerConfig

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from simpo_tiny_run import REPO, tiny_config, training_subset_config  # noqa: E402

SEQ = 128  # above the format's max_length (64): a shared-prompt row holds any of the pairs
ROWS = 8
PAIRS_PER_ROW = 4
LAYOUTS = ("padded", "packed", "shared_prompt")
MODEL = Gpt2Config(max_seq_len=SEQ, hidden_dim=32, num_layers=1, num_heads=2, gradient_checkpointing=False)


@functools.cache
def first_rows(tmp: Path, layout_name: str):
    """The first ROWS training rows of a layout (before the shuffle), stacked as a batch."""
    layout = pair_layout(layout_name, PAIRS_PER_ROW)
    Pos = Axis("position", SEQ)
    with contextlib.chdir(REPO):
        config = tiny_config(tmp, config_path=training_subset_config(tmp))
        splits = build_preference_splits(
            config.data,
            lambda pairs, kept: layout.rows(pairs, kept, Pos),
            seq_len=SEQ,
            key=jrandom.PRNGKey(0),
            validation_split_fraction=None,
        )
        rows = splits.train_rows["tiny_simpo"]
        items = rows.dataset.as_sync_dataset().get_batch(list(range(ROWS)))
        Vocab = Axis("vocab", len(config.data.the_tokenizer))
    Batch = Axis("batch", ROWS)
    batch = jax.tree.map(lambda *xs: hax.stack(Batch, xs), *items, is_leaf=lambda x: isinstance(x, hax.NamedArray))
    return layout, batch, rows.pairs_per_row[:ROWS].tolist(), Vocab, splits.validation["tiny_simpo"]


def model_for(Vocab: Axis):
    # larger token embeddings make the pairs' losses differ, which a mean weighted other than by pair would show
    model = MODEL.build(Vocab, key=jrandom.PRNGKey(0))
    return eqx.tree_at(lambda m: m.embeddings.token_embeddings.weight, model, replace_fn=lambda w: w * 30)


def trainer_config(tmp: Path, per_device: int) -> TrainerConfig:
    return TrainerConfig(
        id="accumulation",
        train_batch_size=ROWS,
        per_device_parallelism=per_device,
        per_device_eval_parallelism=per_device,
        require_accelerator=False,
        tracker=NoopConfig(),
        mp=jmp.get_policy("f32"),
        log_dir=tmp / "logs",
        log_jaxprs=False,
        log_xla_hlo=False,
    )


def one_step(tmp: Path, trainer_type, layout, model, batch, per_device: int, sft_weight: float):
    """Loss, metric values and flat gradients of one step of ``batch`` with ``per_device`` rows a device at once."""
    loss_fn = functools.partial(simpo_loss, layout=layout, beta=2.0, gamma_beta_ratio=0.5, sft_weight=sft_weight)
    extra = {"layout": layout} if trainer_type is SimpoTrainer else {}
    with trainer_type(trainer_config(tmp, per_device), optax.sgd(1.0), loss_fn, **extra) as trainer:

        @functools.partial(hax.named_jit, axis_resources=trainer.parameter_axis_mapping)
        def step(model, batch):
            return trainer._compute_gradients_microbatched(trainer.loss_fn, model, batch, key=None)

        sharded_model = hax.shard(model, trainer.parameter_axis_mapping)
        sharded_batch = hax.shard(batch, trainer.compute_axis_mapping)
        loss, grads, metrics = step(sharded_model, sharded_batch)
        flat = np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array))])
        return float(loss), {k: float(m.value()) for k, m in metrics.items()}, flat


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))


def compare(tmp: Path, layout_name: str, sft_weight: float, per_device: int, plain: bool = False) -> dict:
    """The microbatched step against the unsplit one with ``SimpoTrainer``: both losses and metrics, the relative
    difference of the gradients; with ``plain``, the relative differences Levanter's own ``Trainer`` gives."""
    layout, batch, pairs_per_row, Vocab, _ = first_rows(tmp, layout_name)
    model = model_for(Vocab)
    devices = jax.device_count()
    whole = one_step(tmp, SimpoTrainer, layout, model, batch, ROWS // devices, sft_weight)
    split = one_step(tmp, SimpoTrainer, layout, model, batch, per_device, sft_weight)
    microbatch = per_device * devices
    result = {
        "devices": devices,
        "microbatches": ROWS // microbatch,
        "pairs_per_microbatch": [sum(pairs_per_row[i : i + microbatch]) for i in range(0, ROWS, microbatch)],
        "whole": {"loss": whole[0], **whole[1]},
        "split": {"loss": split[0], **split[1]},
        "gradient_difference": relative(split[2], whole[2]),
    }
    if plain:
        levanter_only = one_step(tmp, Trainer, layout, model, batch, per_device, sft_weight)
        result["plain_loss_difference"] = relative(levanter_only[0], whole[0])
        result["plain_gradient_difference"] = relative(levanter_only[2], whole[2])
    return result


def main(tmp: str, out: str) -> None:
    """Every layout with the SFT term (which also checks the SimPO term), one row a device a microbatch."""
    results = {name: compare(Path(tmp), name, 0.5, 1) for name in LAYOUTS}
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    jnp.zeros(1)  # the backend (with its virtual devices) before anything else
    main(*sys.argv[1:])
