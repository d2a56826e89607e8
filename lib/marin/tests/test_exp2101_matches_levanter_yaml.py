# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
"""exp2101 trains the SimPO of ``simpo_ultrafeedback_llama3_8b.yaml``: its training config, built by Marin's local
executor at run time, equals the YAML's field by field, except for the differences listed here.

Local stand-ins replace what needs the network: UltraFeedback-shaped parquet files (the shipped tiny pairs) are
adopted in place of the Hub download, and an offline Hub cache serves the tiny tokenizer under the SFT model's id.
``uv run pytest -s lib/marin/tests/test_exp2101_matches_levanter_yaml.py`` prints the comparison table.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import draccus
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fray.types import ResourceConfig

from experiments import exp2101_simpo_ultrafeedback as exp
from levanter.main.train_simpo import TrainSimpoConfig
from marin.execution.build_context import BuildContext, VersionCodex, build_context
from marin.execution.lazy import ArtifactStep, materialized_config, run
from marin.training.simpo import simpo_train_config_for_pod

REPO = Path(__file__).resolve().parents[3]
TINY_DATA = REPO / "lib" / "levanter" / "data" / "tiny_simpo"
VERSION = "2026.01.24"
TRAIN_PAIRS = 300  # stand-in train_prefs rows

# Where the two doors differ on purpose. Everything else the training reads must be equal.
INTENDED_DIFFERENCES = {
    "trainer.num_train_steps": "YAML: 478, one epoch of the 61,135 train_prefs pairs; exp2101: one epoch of the cache "
    "it built (checked below)",
    "trainer.id": "run id: exp2101's comes from its step path",
    "trainer.tracker.replicate_path": "Marin copies tracker metrics into the step's output",
    "trainer.tracker.name": "W&B display name: the run id on Marin",
    "trainer.checkpointer.base_path": "output path",
    "trainer.checkpointer.append_run_id_to_base_path": "Marin's output path already names the run",
    "trainer.checkpointer.temporary_base_path": "output path",
    "trainer.load_checkpoint_path": "Marin resumes from the step's own checkpoints (output path)",
    "trainer.checkpointer.save_interval": "rolling checkpoint cadence (15 min vs Marin's 10 min)",
    "trainer.checkpointer.keep": "permanent checkpoints every 200 steps on Marin",
    "trainer.mesh.compute_mapping": "Marin's data-parallel mesh layout (hardware plumbing)",
    "trainer.allow_nondivisible_batch_size": "Marin's default; 128 pairs divide the pods' data axes anyway",
    "trainer.require_accelerator": "this test stands a CPU in for the TPU pod",
    "hf_save_path": "output path",
    "hf_save_steps": "export cadence (every 200 steps on Marin, once at the end in the YAML)",
    "data.cache_dir": "cache location",
    "data.auto_build_caches": "Marin's tokenize steps build the caches; training only reads them",
    "data.components": "component names and cache locations (the formats are compared below)",
    "data.train_weights": "component names; Marin adds test_prefs as a weight-0 validation component",
}


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _encoded(config) -> dict[str, object]:
    return _flatten(json.loads(json.dumps(draccus.encode(config), default=str)))


def _write_ultrafeedback_stand_in(raw: Path) -> None:
    rows = {
        split: [json.loads(line) for line in (TINY_DATA / name).read_text().splitlines()]
        for split, name in (("train_prefs", "train.jsonl"), ("test_prefs", "validation.jsonl"))
    }
    rows["train_prefs"] = rows["train_prefs"][:TRAIN_PAIRS]
    (raw / "data").mkdir(parents=True)
    for split, split_rows in rows.items():
        pq.write_table(pa.Table.from_pylist(split_rows), raw / "data" / f"{split}-00000-of-00001.parquet")


def _offline_hub_with_stand_in_tokenizer(hub: Path) -> None:
    repo = hub / f"models--{exp.SFT_MODEL.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in (TINY_DATA / "tokenizer").iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.fixture(scope="module")
def both_configs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp2101")
    raw, hub, prefix = tmp / "raw", tmp / "hub", tmp / "marin"
    _write_ultrafeedback_stand_in(raw)
    _offline_hub_with_stand_in_tokenizer(hub)
    patch = pytest.MonkeyPatch()
    patch.setenv("MARIN_PREFIX", str(prefix))
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    downloads = []

    def adopt_stand_in(name, *, hf_id, revision, urls_glob, version):
        downloads.append((hf_id, revision, tuple(urls_glob)))
        return ArtifactStep.adopt(name, version, str(raw))

    patch.setattr(exp, "hf_download", adopt_stand_in)
    try:
        with build_context(BuildContext(versions=VersionCodex(default=VERSION))):
            step = exp.build()
        run(*step.deps)  # download stand-in -> Marin's tokenize steps, for real
        pod = materialized_config(step, str(prefix))
        # the TPU pod's region check needs gs:// paths; a CPU stands in for it
        marin = simpo_train_config_for_pod(dataclasses.replace(pod, resources=ResourceConfig.with_cpu()))
    finally:
        patch.undo()
    assert downloads == [
        (
            "HuggingFaceH4/ultrafeedback_binarized",
            exp.ULTRAFEEDBACK_REVISION,
            ("data/train_prefs-*.parquet", "data/test_prefs-*.parquet"),
        )
    ]
    with open(exp.RECIPE_PATH) as f:
        yaml = draccus.load(TrainSimpoConfig, f)
    return yaml, marin, step


def comparison_rows(yaml: TrainSimpoConfig, marin: TrainSimpoConfig) -> list[tuple[str, object, object]]:
    """(field, YAML value, exp2101 value) for every field either config sets, the data formats included."""
    ours, theirs = _encoded(yaml), _encoded(marin)
    (yaml_format,) = [c.format for c in yaml.data.components.values()]
    rows = [(key, ours.get(key, "<unset>"), theirs.get(key, "<unset>")) for key in sorted(ours.keys() | theirs.keys())]
    rows = [(k, a, b) for k, a, b in rows if not k.startswith(("data.components.", "data.train_weights."))]
    for name, component in marin.data.components.items():
        for key, value in _encoded(component.format).items():
            yaml_value = _encoded(yaml_format).get(key, "<unset>")
            rows.append((f"data.format[{name}].{key}", yaml_value, value))
    rows.append(("data.components", sorted(yaml.data.components), sorted(marin.data.components)))
    rows.append(("data.train_weights", yaml.data.train_weights, marin.data.train_weights))
    return rows


def comparison_table(rows: list[tuple[str, object, object]]) -> str:
    def cell(value: object) -> str:
        text = str(value).replace("\n", "\\n").replace("|", "\\|")
        return text if len(text) <= 60 else text[:57] + "..."

    lines = ["| field | YAML | exp2101 | |", "|---|---|---|---|"]
    for key, a, b in rows:
        verdict = (
            "same" if a == b else ("intended: " + INTENDED_DIFFERENCES[_listed(key)] if _intended(key) else "DIFFERS")
        )
        lines.append(f"| {key} | {cell(a)} | {cell(b)} | {verdict} |")
    return "\n".join(lines)


def _listed(key: str) -> str:
    return next(k for k in INTENDED_DIFFERENCES if key == k or key.startswith(k + "."))


def _intended(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in INTENDED_DIFFERENCES)


def test_exp2101_trains_what_the_levanter_yaml_trains(both_configs):
    yaml, marin, step = both_configs
    rows = comparison_rows(yaml, marin)
    print(comparison_table(rows))
    unintended = [(k, a, b) for k, a, b in rows if a != b and not _intended(k)]
    assert unintended == [], "\n".join(f"{k}: YAML {a!r} != exp2101 {b!r}" for k, a, b in unintended)
    differing = {k for k, a, b in rows if a != b}
    stale = [k for k in INTENDED_DIFFERENCES if not any(d == k or d.startswith(k + ".") for d in differing)]
    assert stale == [], f"listed as differing but equal: {stale}"

    # the fields that change training, spelled out, so a field the encoding missed cannot slip through
    assert (marin.beta, marin.gamma_beta_ratio, marin.loss_type) == (2.0, 0.5, "sigmoid")
    assert marin.optimizer == yaml.optimizer
    assert (marin.optimizer.beta1, marin.optimizer.beta2, marin.optimizer.epsilon) == (0.9, 0.999, 1e-8)
    assert marin.trainer.mp == yaml.trainer.mp
    assert marin.trainer.train_batch_size == yaml.trainer.train_batch_size == 128
    assert marin.train_seq_len == yaml.train_seq_len == 2048
    assert marin.model == yaml.model and marin.use_hf_model_config == yaml.use_hf_model_config
    assert marin.initialize_from_hf == yaml.initialize_from_hf == "princeton-nlp/Llama-3-Base-8B-SFT"
    (yaml_format,) = [c.format for c in yaml.data.components.values()]
    for component in marin.data.components.values():
        assert component.format == yaml_format
    # steps per epoch: the same rule gives the YAML's 478 on the real train_prefs
    assert marin.trainer.num_train_steps == math.ceil(TRAIN_PAIRS / 128)
    assert yaml.trainer.num_train_steps == math.ceil(61_135 / 128)
    train_prefs, test_prefs = step.deps
    assert marin.data.train_weights == {train_prefs.name: 1.0, test_prefs.name: 0.0}


def test_a_recipe_field_cannot_be_restated_on_the_marin_side():
    from experiments.simple_simpo_config import SimpleSimPOConfig

    with pytest.raises(ValueError, match="learning_rate"):
        SimpleSimPOConfig.from_train_config(
            exp.recipe, resources=ResourceConfig.with_cpu(), num_train_epochs=1, learning_rate=1e-6
        )
