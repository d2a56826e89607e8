# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0

"""Marin defaults for preference training: tokenized preference pairs and the SimPO training step.

Both return lazy :class:`~marin.execution.lazy.ArtifactStep` handles; nothing runs (and nothing is read
from the network) until the handles are built, e.g. by :func:`marin.execution.lazy.run` or an
experiment's ``--run``.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import jmp
from fray.types import GpuConfig, ResourceConfig
from rigging.filesystem.storage_path import prefix_join

from experiments.simple_simpo_config import SimpleSimPOConfig
from haliax.partitioning import ResourceAxis
from levanter.adaptor import NoAdaptorConfig
from levanter.checkpoint import CheckpointerConfig
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.splits import num_validation_pairs
from levanter.data.text.datasets import DatasetComponent, DatasetComponentBase, UrlDatasetSourceConfig
from levanter.data.text.preference import PreferenceChatLmDatasetFormat, PreferenceLmDataConfig
from levanter.main.train_simpo import TrainSimpoConfig
from levanter.models.lm_model import LmConfig
from levanter.optim.config import AdamConfig
from levanter.schedule import BatchSchedule
from levanter.simpo.run.tags import FORBIDDEN_RUN_TAG, PREFERENCE_RUN_TAG
from levanter.store.cache import CacheLedger, CacheMetadata
from levanter.tokenizers import load_tokenizer
from levanter.tracker.wandb import WandbConfig
from levanter.trainer import TrainerConfig
from levanter.utils.mesh import MeshConfig
from marin.execution.artifact import Artifact
from marin.execution.build_context import resolve_version
from marin.execution.lazy import ArtifactStep, StepContext
from marin.execution.remote import remote
from marin.experiment.data import mixture
from marin.experiment.namespacing import user_namespaced_name
from marin.experiment.train import MARIN_PRECISION
from marin.processing.tokenize.cache_stats import read_tokenized_cache_stats
from marin.processing.tokenize.tokenize import TokenizeConfig, TokenizedCache, tokenize
from marin.training.simpo import TrainSimpoOnPodConfig, run_levanter_train_simpo
from marin.training.training import LevanterCheckpoint, resolve_training_env

# Marin's standard data-parallel layout (as in marin.experiment.train): the token axes ride the replica and
# data mesh axes. Hardware plumbing, not an experiment choice.
_TOKEN_AXES = (ResourceAxis.REPLICA_DCN, ResourceAxis.REPLICA, ResourceAxis.DATA)
# Rolling checkpoints for preemption recovery; permanent ones follow steps_per_checkpoint.
_RESUMPTION_INTERVAL = timedelta(minutes=10)


class TokenizedPreferenceCache(TokenizedCache):
    """A tokenized cache of chosen/rejected pairs. Unlike Marin's text caches, its format is the recorded
    preference format, so the chat template and fields it was built with travel to training."""

    @property
    def format(self) -> PreferenceChatLmDatasetFormat:
        record_format = ((self.record.config if self.record is not None else None) or {}).get("format") or {}
        if not isinstance(record_format, dict):
            raise ValueError(f"{self.path}: the cache record's format is not a mapping: {record_format!r}")
        # JSON values, passed to the format's own fields
        recorded: dict[str, Any] = record_format
        # the record holds the format's fields without its type; only preference_prompt_completion has these
        kind = PromptCompletionPreferenceFormat if "completion_tokens" in recorded else PreferenceChatLmDatasetFormat
        fields = {f.name for f in dataclasses.fields(kind)}
        return kind(**{k: v for k, v in recorded.items() if k in fields})


def _tokenize_preferences(config: TokenizeConfig) -> None:
    """Marin's tokenize, then the preprocessor's settings written into each split's cache ledger, where Levanter
    records them when it builds a cache: training checks them against its data format before reading pairs."""
    tokenize(config)
    metadata = config.format.build_preprocessor(load_tokenizer(config.tokenizer)).metadata
    for split, inputs in (("train", config.train_paths), ("validation", config.validation_paths)):
        if inputs:
            cache_dir = prefix_join(config.cache_path, split)
            ledger = CacheLedger.load(cache_dir)
            dataclasses.replace(ledger, metadata=CacheMetadata(metadata))._serialize_and_commit(cache_dir)


def default_preference_tokenize(
    name: str,
    *,
    tokenizer: str,
    raw: ArtifactStep[Artifact] | None = None,
    glob: str | None = None,
    paths: Sequence[str] | None = None,
    validation: bool = False,
    chat_template: str | None = None,
    pairs: SimpleSimPOConfig | None = None,
    version: str | None = None,
    resources: ResourceConfig | None = None,
) -> ArtifactStep[TokenizedPreferenceCache]:
    """Tokenize preference pairs (``chosen``/``rejected`` chat transcripts) with Marin's tokenize pipeline.

    The input is ``raw`` + ``glob`` (files inside a download step) or ``paths`` (files or globs used as
    given). ``validation=True`` writes the cache's validation split. ``chat_template`` overrides the
    tokenizer's. The cache is the Levanter YAMLs' ``preference_prompt_completion`` format, whose builder makes
    every per-pair decision: what ``|y|`` counts and how over-long pairs are cut come from ``pairs``, the
    training run's ``SimpleSimPOConfig`` (``completion_tokens``, ``max_seq_len``, ``max_prompt_length``,
    ``truncation_mode``; None: the defaults), and ``default_simpo`` refuses a cache built with other settings.
    ``resources`` runs the tokenization as its own Fray job; None runs it in the calling process.
    """
    version = resolve_version(name, version)
    if (raw is None) == (paths is None):
        raise ValueError(f"{name}: provide exactly one of raw (with glob) or paths")
    if (raw is None) != (glob is None):
        raise ValueError(f"{name}: raw and glob must be given together")
    given_paths = [*paths] if paths is not None else []
    if pairs is not None:
        data_format = pairs.pair_format(chat_template)
    else:
        data_format = PromptCompletionPreferenceFormat(chat_template=chat_template)

    def build_config(ctx: StepContext) -> TokenizeConfig:
        inputs = [f"{ctx.artifact_path(raw)}/{glob}"] if raw is not None else given_paths
        return TokenizeConfig(
            train_paths=[] if validation else inputs,
            validation_paths=inputs if validation else [],
            cache_path=ctx.output_path,
            tokenizer=tokenizer,
            format=data_format,
        )

    return ArtifactStep(
        name=name,
        version=version,
        artifact_type=TokenizedPreferenceCache,
        run=remote(_tokenize_preferences, resources=resources) if resources is not None else _tokenize_preferences,
        build_config=build_config,
        deps=(raw,) if raw is not None else (),
    )


_PAIR_SETTINGS = ("completion_tokens", "max_length", "max_prompt_length", "truncation_mode")


def _training_format(
    config: SimpleSimPOConfig, recorded: PromptCompletionPreferenceFormat
) -> PromptCompletionPreferenceFormat:
    """The cache's recorded format, whose |y| definition and budgets must be the run's: they were applied when
    the cache was built."""
    wanted = config.pair_format(recorded.chat_template)
    differ = [
        f"{k}: cache {getattr(recorded, k)!r}, run {getattr(wanted, k)!r}"
        for k in _PAIR_SETTINGS
        if getattr(recorded, k) != getattr(wanted, k)
    ]
    if differ:
        raise ValueError(
            "the preference cache was built with other pair settings than this run's (" + "; ".join(differ) + "); "
            "tokenize with default_preference_tokenize(..., pairs=<this SimpleSimPOConfig>) under a new version"
        )
    return recorded


def _with_training_format(
    name: str, component: DatasetComponentBase, config: SimpleSimPOConfig
) -> DatasetComponentBase:
    if not isinstance(component, DatasetComponent):
        raise ValueError(f"preference cache {name!r} is a {type(component).__name__}, not a cache-backed component")
    if not isinstance(component.format, PromptCompletionPreferenceFormat):
        # its |y| and cuts would differ from the Levanter YAMLs', and the run's budgets could not apply
        raise ValueError(
            f"preference cache {name!r} is a {type(component.format).__name__} cache with no prompt boundary; "
            "re-tokenize it with default_preference_tokenize under a new version"
        )
    data_format = _training_format(config, component.format)
    source = dataclasses.replace(component.source, format=data_format) if component.source is not None else None
    return dataclasses.replace(component, source=source, format=data_format)


def _fingerprint_component(cache_dir: str, config: SimpleSimPOConfig) -> DatasetComponent:
    # No cache record exists at fingerprint time; the dataset's identity is its name@version.
    data_format = config.pair_format()
    source = UrlDatasetSourceConfig(
        tags=[], train_urls=[], validation_urls=[], cache_dir=cache_dir, format=data_format
    )
    return DatasetComponent(source=source, cache_dir=cache_dir, format=data_format, tags=[])


def _preference_data(
    ctx: StepContext,
    train: Mapping[ArtifactStep[TokenizedPreferenceCache], float],
    validation: Sequence[ArtifactStep[TokenizedPreferenceCache]],
    config: SimpleSimPOConfig,
) -> PreferenceLmDataConfig:
    """The weighted training components plus weight-0 validation components, full Feistel-permutation shuffle."""
    expected_tokenizer = config.tokenizer
    if ctx.is_fingerprint:
        handles = [*train, *validation]
        return PreferenceLmDataConfig(
            components={h.name: _fingerprint_component(ctx.artifact_path(h), config) for h in handles},
            train_weights={h.name: train.get(h, 0.0) for h in handles},
            tokenizer=expected_tokenizer or "<tokenizer>",
            cache_dir=None,
            shuffle=True,
            permutation_type="feistel",
        )
    # mixture() reads each cache's tokenizer, format and location from its record
    # ArtifactStep's type parameter is invariant in Marin, though a step that makes a TokenizedPreferenceCache makes
    # a TokenizedCache, all that mixture reads
    lm_data = mixture(ctx, dict(train), validation=validation, shuffle=True)  # type: ignore[arg-type]
    data = PreferenceLmDataConfig.from_lm_data_config(lm_data)
    if expected_tokenizer is not None and data.tokenizer != expected_tokenizer:
        raise ValueError(f"The preference caches were tokenized with {data.tokenizer}, not {expected_tokenizer}")
    components: dict[str, DatasetComponentBase] = {
        name: _with_training_format(name, c, config) for name, c in data.components.items()
    }
    return dataclasses.replace(data, components=components)


def _num_train_steps(
    ctx: StepContext, train: ArtifactStep[TokenizedPreferenceCache], config: SimpleSimPOConfig
) -> int:
    if config.num_train_steps is not None:
        return config.num_train_steps
    assert config.num_train_epochs is not None
    if ctx.is_fingerprint:
        # as in marin.experiment.train: the epoch count stands in for the step count, which needs the built cache
        return config.num_train_epochs
    pairs = read_tokenized_cache_stats(ctx.resolved(train).cache_dir, "train").total_elements
    if config.validation_split_fraction is not None:
        pairs -= num_validation_pairs(pairs, config.validation_split_fraction)
    schedule = BatchSchedule(config.train_batch_size)
    return schedule.find_step_containing_offset(config.num_train_epochs * pairs - 1) + 1


def _initialize_from_hf(config: SimpleSimPOConfig) -> bool | str:
    if isinstance(config.initialize_from_hf, str):
        return config.initialize_from_hf
    wanted = config.initialize_from_hf
    if wanted is None:
        wanted = config.model_name_or_path is not None and config.initialize_from_checkpoint_path is None
    if not wanted:
        return False
    if config.model_name_or_path is None:
        raise ValueError("initialize_from_hf=True needs model_name_or_path")
    return config.model_name_or_path


def _check_lengths(name: str, model_config: LmConfig, config: SimpleSimPOConfig) -> None:
    """Fail the graph build, not the pod, when the sequences cannot fit the model or the budgets cannot fit them."""
    if config.max_seq_len > model_config.max_seq_len:
        raise ValueError(
            f"{name}: max_seq_len {config.max_seq_len} is longer than the model's max_seq_len "
            f"{model_config.max_seq_len}"
        )
    config.pair_format()  # raises when max_prompt_length leaves no room


def _run_tags(tags: Sequence[str]) -> list[str]:
    # the convention train_simpo applies to every W&B tracker (levanter.simpo.run.tags), refused here at graph build
    if any(tag.lower() == FORBIDDEN_RUN_TAG for tag in tags):
        raise ValueError(f"Tag SimPO runs {PREFERENCE_RUN_TAG!r}, not {FORBIDDEN_RUN_TAG!r} (legacy convention)")
    return [*tags] if PREFERENCE_RUN_TAG in tags else [*tags, PREFERENCE_RUN_TAG]


def _train_job(pod_config: TrainSimpoOnPodConfig) -> None:
    """Dispatch the SimPO run as its own Fray job on the configured resources."""
    # as for Marin's LM runs: a GPU job needs XLA_FLAGS in its environment before JAX starts; TPU and CPU jobs
    # resolve the environment in the worker, where the cluster's secrets are mounted
    env_vars = (
        resolve_training_env(pod_config.env_vars, pod_config.resources)
        if isinstance(pod_config.resources.device, GpuConfig)
        else {}
    )
    remote(run_levanter_train_simpo, resources=pod_config.resources, env_vars=env_vars)(pod_config)


def default_simpo(
    name: str,
    tokenized: ArtifactStep[TokenizedPreferenceCache] | Mapping[ArtifactStep[TokenizedPreferenceCache], float],
    model_config: LmConfig,
    simpo_config: SimpleSimPOConfig,
    *,
    validation: Sequence[ArtifactStep[TokenizedPreferenceCache]] = (),
    tags: Sequence[str] = (),
    version: str | None = None,
    run_id: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> ArtifactStep[LevanterCheckpoint]:
    """A SimPO training run on ``tokenized`` as a Marin step producing a Levanter checkpoint.

    ``tokenized`` is one preference cache, or several with their mixture weights (``{step: weight}``), mixed as
    Levanter's data config mixes components; each keeps its own statistics and held-out metrics. A mixture trains
    for ``num_train_steps`` (an epoch of a mixture is not one number).

    ``validation`` caches are evaluated when ``simpo_config.validation_split_fraction`` is None (otherwise the
    held-out pairs come from the training cache). Runs are tagged ``"dpo"``, never ``"simpo"``. The resources
    are a runtime argument: they pick where the job runs without changing the checkpoint's identity.
    ``version`` defers to the ambient build context when omitted; a ``dev`` version is namespaced per user.
    ``run_id`` (the tracker run and log name) defaults to the step's path with dashes for slashes.
    """
    weights = dict(tokenized) if isinstance(tokenized, Mapping) else {tokenized: 1.0}
    if len(weights) > 1 and simpo_config.num_train_epochs is not None:
        raise ValueError(f"{name}: a mixture of preference caches trains for num_train_steps, not num_train_epochs")
    version = resolve_version(name, version)
    step_name = user_namespaced_name(name, version)
    # Marin would otherwise take the output directory's basename, which is just the version ("dev") here, so
    # unrelated runs would share (and resume into) one tracker run.
    run_id = run_id or f"{step_name}-{version}".replace("/", "-")
    if validation and simpo_config.validation_split_fraction is not None:
        raise ValueError(
            "validation caches are only evaluated with validation_split_fraction=None; "
            f"got {simpo_config.validation_split_fraction}"
        )
    run_tags = _run_tags(tags)
    initialize_from_hf = _initialize_from_hf(simpo_config)
    _check_lengths(name, model_config, simpo_config)

    def build_config(ctx: StepContext) -> TrainSimpoOnPodConfig:
        train_config = TrainSimpoConfig(
            data=_preference_data(ctx, weights, validation, simpo_config),
            trainer=TrainerConfig(
                id=run_id,
                tracker=WandbConfig(
                    project=simpo_config.wandb_project,
                    name=simpo_config.wandb_name or run_id,
                    group=simpo_config.wandb_group,
                    tags=run_tags,
                    replicate_path=ctx.output_path,
                ),
                mp=jmp.get_policy(MARIN_PRECISION),
                train_batch_size=simpo_config.train_batch_size,
                per_device_parallelism=simpo_config.per_device_parallelism,
                num_train_steps=_num_train_steps(ctx, next(iter(weights)), simpo_config),
                steps_per_eval=simpo_config.steps_per_eval,
                checkpointer=CheckpointerConfig(
                    save_interval=_RESUMPTION_INTERVAL, keep=[dict(every=simpo_config.steps_per_checkpoint)]
                ),
                # lists, as MeshConfig declares, so the config decodes back to itself
                mesh=MeshConfig(compute_mapping={"token": [*_TOKEN_AXES], "token_repeat": [*_TOKEN_AXES]}),
                allow_nondivisible_batch_size=True,
                seed=simpo_config.seed,
            ),
            model=model_config,
            adapter=simpo_config.lora if simpo_config.lora is not None else NoAdaptorConfig(),
            train_seq_len=simpo_config.max_seq_len,
            optimizer=AdamConfig(
                learning_rate=simpo_config.learning_rate,
                weight_decay=simpo_config.weight_decay,
                warmup=simpo_config.warmup,
                lr_schedule=simpo_config.lr_schedule,
                min_lr_ratio=simpo_config.min_lr_ratio,
                max_grad_norm=simpo_config.max_grad_norm,
                beta1=simpo_config.beta1,
                beta2=simpo_config.beta2,
                epsilon=simpo_config.epsilon,
            ),
            beta=simpo_config.beta,
            gamma_beta_ratio=simpo_config.gamma_beta_ratio,
            loss_type=simpo_config.loss_type,
            label_smoothing=simpo_config.label_smoothing,
            sft_weight=simpo_config.sft_weight,
            pair_layout=simpo_config.pair_layout,
            max_pairs_per_row=simpo_config.max_pairs_per_row,
            initialize_from_hf=initialize_from_hf,
            use_hf_model_config=simpo_config.use_hf_model_config,
            initialize_from_checkpoint_path=simpo_config.initialize_from_checkpoint_path,
            validation_split_fraction=simpo_config.validation_split_fraction,
            run_initial_eval=simpo_config.run_initial_eval,
            samples=simpo_config.samples,
            hf_save_steps=simpo_config.steps_per_hf_export,
            hf_save_dtype=simpo_config.hf_save_dtype,
            hf_generation_eos_token_ids=simpo_config.hf_generation_eos_token_ids,
        )
        return TrainSimpoOnPodConfig(
            train_config=train_config,
            resources=ctx.runtime_arg("train_resources"),
            output_path=ctx.output_path,
            env_vars=env_vars,
        )

    return ArtifactStep(
        name=step_name,
        version=version,
        artifact_type=LevanterCheckpoint,
        run=_train_job,
        build_config=build_config,
        deps=(*weights, *validation),
        runtime_args={"train_resources": simpo_config.resources},
    )
