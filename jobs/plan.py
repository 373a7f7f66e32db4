"""The resolved experiment plan: what every job of a run must agree on, fixed once and stored.

``ExperimentPlan.resolve(config)`` turns the typed config into the settings that decide a
run's results: the ``lvlm`` shorthand spelt out as the caption engine's full representation
name (from the engine's pure identity: no model is loaded), the base representations split
from the fusions, the baselines, the candidate policy, the excluded splits, K, the Ks and the
seeds. It serialises to canonical JSON (sorted keys) whose sha256 is the plan's hash: the same
config gives the same hash, any changed setting another.

The ``plans`` table (run_id, plan, plan_hash, created_at) keeps one plan per run id.
``pipeline`` stores it before its first stage and passes its run id to every later stage;
``embed``, ``fuse``, ``profiles``, ``topk`` and ``evaluate`` read the plan stored under their
``--run-id`` (``plan_for_run``; without one, their own run id), or resolve, store and use their
own when the run has none yet. A job whose own config disagrees with the stored plan on a
setting that matters to it (its ``*_FIELDS``) is refused (``ConfigError``: exit 2) with the
setting and both values. ``caption`` reads the plan only when given ``--run-id``
(``check_caption_agrees``: its engine's representation must be one the plan ranks) and never
stores one: it is a cache over images, and a bare ``vlm4rec caption`` touches no plan.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from udfs.representations import (
    ALS,
    ALL_FUSIONS,
    LVLM,
    RepresentationError,
    lvlm_name,
    parse_representation,
    required_base_representations,
    spell_out_lvlm,
    validate_representations,
)

from .config import BASELINES, AlsConf, CaptionConf, Config, ConfigError, FuseConf

log = logging.getLogger(__name__)

# Plan field -> the config key a user sets it with, for messages that name the fix.
SETTING_KEYS: dict[str, str] = {
    "dataset": "dataset.name",
    "representations": "experiment.representations",
    "baselines": "experiment.topk.baselines",
    "candidates": "experiment.topk.candidates (--candidates)",
    "exclude": "experiment.topk.exclude (--exclude)",
    "k": "experiment.topk.k (--k)",
    "topk_seed": "experiment.topk.seed",
    "ks": "experiment.evaluate.ks",
    "bootstrap_samples": "experiment.evaluate.bootstrap_samples",
    "evaluate_seed": "experiment.evaluate.seed",
    "significance_test": "experiment.evaluate.test",
    "half_life_days": "experiment.profiles.half_life_days",
    "concat_weights": "experiment.embed.concat_weights",
    "fuse": "experiment.fuse",
    "als": "experiment.profiles.als",
}

# The plan fields each job's results depend on; a stored plan that differs on one is refused.
PROFILES_FIELDS = ("dataset", "representations", "half_life_days", "concat_weights", "fuse", "als")
FUSE_FIELDS = ("dataset", "representations", "fuse")
TOPK_FIELDS = ("dataset", "representations", "baselines", "candidates", "exclude", "k", "topk_seed")
EVALUATE_FIELDS = ("dataset", "representations", "baselines", "candidates", "exclude", "ks", "bootstrap_samples",
                   "evaluate_seed", "significance_test")


def caption_representation(conf: CaptionConf) -> str:
    """``lvlm:<engine>:<model>:<prompt_id>`` of ``experiment.caption``, from the engine's pure
    identity (``udfs.caption.engine.engine_identity``): no model is loaded, no torch imported
    for ``tags``."""
    from udfs.caption.engine import engine_identity
    from udfs.caption.kinds import engine_kind

    model = conf.model or engine_kind(conf.engine).default_model
    try:
        _, pid = engine_identity(conf.engine, model, conf.prompt, conf.engine_options())
    except ValueError as exc:
        raise ConfigError(f"experiment.caption.{conf.engine}: {exc}") from exc
    try:
        return lvlm_name(conf.engine, model, pid)
    except RepresentationError as exc:
        raise ConfigError(f"experiment.caption.model '{model}': {exc}") from exc


def _uses_shorthand(name: str) -> bool:
    head, _, parts = name.partition(":")
    return name == "lvlm" or (head in ALL_FUSIONS and "lvlm" in parts.split("+"))


def expand_lvlm(representations: list[str], caption: CaptionConf) -> list[str]:
    """The names with the ``lvlm`` shorthand (alone, or as a fusion part as in
    ``naive:lvlm+visual``) spelt out as the caption engine's full representation name, so that
    configs need not repeat the prompt hash. Names without it come back unchanged."""
    if not any(_uses_shorthand(r) for r in representations):
        return list(representations)
    full = caption_representation(caption)
    return [spell_out_lvlm(r, full) for r in representations]


@dataclass(frozen=True)
class ExperimentPlan:
    """The settings that decide a run's results (see the module doc). Immutable; built by
    ``resolve`` or ``from_json``."""

    dataset: str
    representations: tuple[str, ...]  # the vector representations ranked, canonical full names
    base: tuple[str, ...]  # base representations the vectors come from (fusion parts included)
    fusions: tuple[str, ...]
    baselines: tuple[str, ...]
    candidates: str
    exclude: tuple[str, ...]
    k: int
    ks: tuple[int, ...]
    topk_seed: int
    bootstrap_samples: int
    evaluate_seed: int
    significance_test: str  # the paired test of the comparisons (udfs.evaluate.significance.TESTS)
    half_life_days: float | None
    concat_weights: tuple[tuple[str, float], ...]  # sorted (part, weight) pairs
    # experiment.fuse when a trained fusion is planned, else None: the trained vectors (and so
    # profiles, rankings and metrics) depend on every one of its settings.
    fuse: FuseConf | None = None
    # experiment.profiles.als when ``als`` is ranked, else None.
    als: AlsConf | None = None

    @classmethod
    def resolve(cls, config: Config) -> "ExperimentPlan":
        """The plan of ``config``; ``ConfigError`` naming the setting when it cannot be resolved."""
        experiment = config.experiment
        if not config.dataset.name:
            raise ConfigError("no dataset configured: pass --conf datasets/NAME.yaml (or --set dataset.name=...)")
        names = expand_lvlm(list(experiment.representations), experiment.caption)
        topk = experiment.topk
        # A baseline named among the representations is ranked too.
        baselines = list(dict.fromkeys([*topk.baselines, *(n for n in names if n in BASELINES)]))
        vector_names = [n for n in names if n not in BASELINES]
        try:
            representations = validate_representations(vector_names) if vector_names else []
            base = required_base_representations(representations)
        except RepresentationError as err:
            raise ConfigError(f"experiment.representations: {err}") from None
        fusions = [n for n in representations if parse_representation(n).is_fusion]
        ks = sorted(set(experiment.evaluate.ks))
        return cls(
            dataset=config.dataset.name, representations=tuple(representations), base=tuple(base),
            fusions=tuple(fusions),
            baselines=tuple(baselines), candidates=topk.candidates, exclude=tuple(topk.exclude),
            k=int(topk.k or max(ks)), ks=tuple(ks), topk_seed=int(topk.seed),
            bootstrap_samples=int(experiment.evaluate.bootstrap_samples), evaluate_seed=int(experiment.evaluate.seed),
            significance_test=str(experiment.evaluate.test),
            half_life_days=(None if experiment.profiles.half_life_days is None
                            else float(experiment.profiles.half_life_days)),
            concat_weights=tuple(sorted((str(p), float(w)) for p, w in experiment.embed.concat_weights.items())),
            fuse=experiment.fuse if any(parse_representation(n).is_trained for n in fusions) else None,
            als=experiment.profiles.als if ALS in representations else None,
        )

    @property
    def trained(self) -> tuple[str, ...]:
        """The trained fusions (built by ``fuse``; profiled like base representations)."""
        return tuple(n for n in self.fusions if parse_representation(n).is_trained)

    @property
    def parameter_free(self) -> tuple[str, ...]:
        """The fusions ``embed`` and ``profiles`` build from their parts (naive, concat)."""
        return tuple(n for n in self.fusions if not parse_representation(n).is_trained)

    @property
    def captioned(self) -> tuple[str, ...]:
        """The LVLM representations among ``base``: the ones whose descriptions ``caption`` writes."""
        return tuple(n for n in self.base if parse_representation(n).kind == LVLM)

    @property
    def ranked(self) -> tuple[str, ...]:
        """Every representation ``topk`` ranks: the vector ones, then the baselines."""
        return self.representations + self.baselines

    def fusion_weights(self, parts: tuple[str, ...]) -> dict[str, float] | None:
        """``experiment.embed.concat_weights`` restricted to a concat fusion's parts; None if none."""
        return {p: w for p, w in self.concat_weights if p in parts} or None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        # An absent section is stored as "", as before the sections were typed: same text, same hash.
        return {**out, **{name: "" for name in ("fuse", "als") if out[name] is None}}

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal plans give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def plan_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentPlan":
        # What plans stored before trained fusions, the ALS reference and the test setting existed mean.
        data = {"fuse": "", "als": "", "significance_test": "wilcoxon", **json.loads(text)}
        known = {f.name for f in dataclasses.fields(cls)}
        stale = (f"stored plan has fields {sorted(data)}, this version expects {sorted(known)}: use a new "
                 "--run-id (the plan was stored by another version of vlm4rec)")
        if set(data) != known:
            raise ConfigError(stale)
        data["concat_weights"] = [tuple(pair) for pair in data["concat_weights"]]
        try:
            # The sections are stored as canonical JSON text (so that the plan's hash is the
            # same as before they were typed) and checked again as they are read.
            for name, section in (("fuse", FuseConf), ("als", AlsConf)):
                data[name] = section(**json.loads(data[name])) if data[name] else None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{stale}; {exc}") from None
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def check_agrees(self, stored: "ExperimentPlan", fields: tuple[str, ...], run_id: str, job: str) -> None:
        """Raise ``ConfigError`` naming the first of ``fields`` where this plan (the job's own
        config) differs from ``stored`` (the run's plan), with both values."""
        for name in fields:
            mine, theirs = _plain(getattr(self, name)), _plain(getattr(stored, name))
            if mine != theirs:
                raise ConfigError(
                    f"{job}: {SETTING_KEYS[name]} is {json.dumps(mine)} here but {json.dumps(theirs)} in the plan "
                    f"stored for run id '{run_id}' (plan {stored.plan_hash[:12]}): pass the run's value, or "
                    "use another --run-id for a run with other settings")


def check_caption_agrees(stored: ExperimentPlan, dataset: str, representation: str, run_id: str) -> None:
    """Raise ``ConfigError`` when the caption job's dataset is not the run's, or when the run's
    plan ranks LVLM representations and the caption engine's (``representation``) is not one of
    them: its descriptions would be ones no stage of the run reads."""
    where = f"the plan stored for run id '{run_id}' (plan {stored.plan_hash[:12]})"
    if dataset != stored.dataset:
        raise ConfigError(f"caption: {SETTING_KEYS['dataset']} is {json.dumps(dataset)} here but "
                          f"{json.dumps(stored.dataset)} in {where}: pass the run's dataset, or use another --run-id")
    if stored.captioned and representation not in stored.captioned:
        raise ConfigError(
            f"caption: experiment.caption gives representation {json.dumps(representation)} here but {where} "
            f"ranks {json.dumps(stored.captioned)}: set experiment.caption (engine, model, prompt and the engine's "
            "options) to the run's, or use another --run-id for a run with other settings")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (FuseConf, AlsConf)):
        return json.dumps(dataclasses.asdict(value), sort_keys=True, separators=(",", ":"))
    return value


def plan_texts_without_spark(warehouse: str, run_id: str) -> list[str]:
    """The plan JSON stored under ``run_id``, read with delta-rs (``TableMissing`` when delta-rs
    finds no ``plans`` table)."""
    from udfs.io.warehouse_reader import read_table

    return read_table(warehouse, "plans", equal={"run_id": run_id}, columns=["plan"]).column("plan").to_pylist()


def plan_texts_with_spark(spark, warehouse: str, run_id: str) -> list[str]:
    """The same as ``plan_texts_without_spark``, through Spark (a job and a log replay)."""
    from . import tables

    return [row["plan"] for row in tables.read(spark, warehouse, "plans")
            .filter(tables.slice_filter({"run_id": run_id})).select("plan").collect()]


def run_plan(run, run_id: str) -> ExperimentPlan | None:
    """The plan stored under ``run_id`` (the pipeline's own when ``run`` is its stage), or None."""
    if run.pinned_plan and run.pinned_plan[0] == run_id:
        return run.pinned_plan[1]
    return stored_plan(run.spark, run.warehouse, run_id, run.count)


def stored_plan(spark, warehouse: str, run_id: str, count=None) -> ExperimentPlan | None:
    """The plan kept under ``run_id`` in the ``plans`` table, or None.

    Every job reads it at its start, so it is read with delta-rs, falling back to Spark
    (``jobs.tables.small_read``: a wrongly missing plan would let the job store its own over the
    run's)."""
    from . import tables

    texts = tables.small_read(spark, warehouse, "plans", lambda: plan_texts_without_spark(warehouse, run_id),
                              lambda: plan_texts_with_spark(spark, warehouse, run_id), count)
    return ExperimentPlan.from_json(texts[0]) if texts else None


def store_plan(spark, warehouse: str, run_id: str, plan: ExperimentPlan) -> None:
    """Keep ``plan`` under ``run_id`` (replacing any plan the run had)."""
    import pyarrow as pa

    from . import tables

    row = {"run_id": run_id, "plan": plan.to_json(), "plan_hash": plan.plan_hash,
           "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)}
    frame = pa.Table.from_pylist([row], schema=tables.arrow_schema("plans"))
    tables.replace_slice(spark, warehouse, "plans", frame, {"run_id": run_id})


def plan_for_run(run, run_id: str, fields: tuple[str, ...]) -> ExperimentPlan:
    """The plan every job of ``run_id`` reads: the stored one, after checking that ``run``'s own
    config agrees with it on ``fields``; when the run has none yet, ``run``'s own, stored. A stage
    of a pipeline gets the plan the pipeline resolved from this very config (``run.pinned_plan``):
    nothing to resolve, read or check again."""
    if run.pinned_plan and run.pinned_plan[0] == run_id:
        return run.pinned_plan[1]
    own = ExperimentPlan.resolve(run.config)
    stored = stored_plan(run.spark, run.warehouse, run_id, run.count)
    if stored is None:
        store_plan(run.spark, run.warehouse, run_id, own)
        log.info("run %s: plan %s stored", run_id, own.plan_hash[:12])
        return own
    own.check_agrees(stored, fields, run_id, run.job)
    return stored

