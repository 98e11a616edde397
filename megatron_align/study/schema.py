"""The study file (``configs/studies/*.yaml``) as typed dataclasses; errors read ``file:line: key: message``.

A study names a base run config, the mixture pieces every arm shares (sources, stages with their
budgets and base rules), matrix axes whose values each contribute sources, rules, stage lists,
variables and run-config changes, exclusions, extra single arms, optional ``prepare`` jobs, the
export / post-training / eval settings and the comparisons to report. Arms are composed from
these in :mod:`megatron_align.study.arms`; the job DAG is built in :mod:`megatron_align.study.plan`.

Relative paths are relative to the study file's directory; ``${VAR}`` / ``${VAR:-default}`` in
paths come from the environment at plan time; ``{study_dir}`` anywhere in a string value is the
study directory the plan is written to.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_align.config.yaml_lines import (ConfigError, LineMap, describe_value, expand_env, load_yaml,
                                              location)
from megatron_align.evals.formats import IDENTITIES as _IDENTITY_TEXTS
from megatron_align.evals.formats import PASSAGES, PROMPT_STYLES as _PROMPT_FORMATS, SCORINGS

TRAIN_KINDS = ("pretrain", "midtrain", "cpt")
JOB_KINDS = TRAIN_KINDS + ("sft", "export", "dpo", "eval", "data")
STUDY_DIR_PLACEHOLDER = "{study_dir}"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
IDENTITIES = tuple(_IDENTITY_TEXTS)  # the choices of megatron-align eval misalignment
PROMPT_STYLES = tuple(_PROMPT_FORMATS)
CHAT_TEMPLATES = ("auto", "on", "off")
EXPORT_DTYPES = ("fp32", "bf16")

# Run-config keys holding paths: resolved against the file that sets them.
RUN_PATH_KEYS = ("data.tokenizer", "data.prefix", "data.cache_dir", "checkpoint.init_from")


class StudyError(ConfigError):
    """A bad study file: the message names the file, line and key."""


@dataclass(frozen=True)
class Overlay:
    """A run-config fragment and the file it was written in (for paths and error locations)."""

    values: LineMap
    path: str


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    tokens: Optional[float]
    iterations: Optional[int]
    seq_length: Optional[int]
    global_batch_size: Optional[int]
    rules: LineMap  # category -> rule, as the mixture YAML writes it
    continues: Optional[str]
    run: Optional[Overlay]
    where: str


@dataclass(frozen=True)
class Contribution:
    """What an axis value (or an extra arm) changes in an arm."""

    sources: LineMap  # source name -> {prefix, category} (a partial entry edits; null removes)
    rules: dict[str, LineMap]  # stage -> {category: rule (null removes)}
    stages: Optional[tuple[str, ...]]  # the arm's stage list, replacing the default
    vars: dict[str, str]  # names usable as {name} in rule categories
    run: Optional[Overlay]
    description: str
    where: str


@dataclass(frozen=True)
class AxisValue:
    axis: str
    name: str
    label: str  # the value's part of the arm name ("" adds nothing)
    change: Contribution


@dataclass(frozen=True)
class ExtraArm:
    name: str
    values: dict[str, str]  # axis -> value it starts from
    change: Contribution


@dataclass(frozen=True)
class Exclusion:
    match: dict[str, tuple[str, ...]]  # axis -> values; an arm matching every axis is excluded
    where: str


@dataclass(frozen=True)
class PrepareJob:
    id: str
    kind: str
    command: str
    where: str


@dataclass(frozen=True)
class ExportSpec:
    dtype: str = "fp32"
    verify: Optional[bool] = None  # None: the export's default (verify when it fits in memory)


@dataclass(frozen=True)
class CapabilitySpec:
    tasks: tuple[str, ...]
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None


@dataclass(frozen=True)
class EvalSpec:
    items: Optional[str] = None  # None: the packaged starter items
    split: Optional[str] = None  # the split the report uses (None: every item)
    scoring: str = "letter"
    prompt_style: str = "project"
    identity: str = "none"
    passage: str = "none"
    batch_size: int = 16
    device: str = "auto"
    posttrained_identity: str = "hhh"
    posttrained_chat_template: str = "auto"
    capability: Optional[CapabilitySpec] = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> settings changed for the base models


@dataclass(frozen=True)
class DpoSpec:
    config: str
    data: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class PosttrainSpec:
    sft: Optional[Overlay] = None
    dpo: Optional[DpoSpec] = None


@dataclass(frozen=True)
class Comparisons:
    baseline: Optional[str] = None
    arms: Optional[tuple[str, ...]] = None  # None: every other arm
    where: str = ""


@dataclass(frozen=True)
class SlurmSpec:
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)  # job kind or "default" -> sbatch options
    scripts: Optional[str] = None  # directory of the launch scripts (default: launch/slurm of this checkout)


@dataclass(frozen=True)
class Study:
    path: str  # the study file, absolute
    name: str
    description: str
    study_dir: str  # absolute; what {study_dir} became
    run: Optional[Overlay]
    mixture: dict  # data_root (absolute), valid_fraction, max_epochs (optional)
    sources: LineMap
    stages: dict[str, StageSpec]
    arm_stages: tuple[str, ...]
    axes: dict[str, dict[str, AxisValue]]
    exclude: tuple[Exclusion, ...]
    extra_arms: tuple[ExtraArm, ...]
    prepare: tuple[PrepareJob, ...]
    export: ExportSpec
    eval: EvalSpec
    posttrain: PosttrainSpec
    comparisons: Comparisons
    replicate_axis: Optional[str]  # the axis whose values are training replicates (seeds), pooled by the report
    local_nproc: int
    slurm: SlurmSpec
    where: dict[str, str]  # top-level key -> file:line

    @property
    def directory(self) -> Path:
        return Path(self.path).parent


# ---------------------------------------------------------------------------------------------
# Reading helpers


class _Reader:
    def __init__(self, path: str):
        self.path = path

    def where(self, mapping: Any, key: Optional[str], keypath: str) -> str:
        return f"{location(self.path, mapping, key)}: {keypath}" if keypath else location(self.path, mapping, key)

    def fail(self, mapping: Any, key: Optional[str], keypath: str, message: str) -> StudyError:
        return StudyError(f"{self.where(mapping, key, keypath)}: {message}")

    def only_keys(self, mapping: LineMap, allowed: tuple[str, ...], keypath: str) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.fail(mapping, key, f"{keypath}.{key}" if keypath else str(key),
                                f"unknown key (allowed: {', '.join(allowed)})")

    def mapping(self, parent: Any, key: str, keypath: str, *, empty_ok: bool = True) -> LineMap:
        value = parent[key]
        if value is None and empty_ok:
            value = LineMap()
            value.line, value.lines = getattr(parent, "lines", {}).get(key, 0), {}
        if not isinstance(value, dict):
            raise self.fail(parent, key, keypath, f"expected a mapping, got {describe_value(value)}")
        return value

    def string(self, mapping: LineMap, key: str, keypath: str, *, choices: tuple[str, ...] = (),
               empty_ok: bool = False) -> str:
        value = mapping[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or (not value and not empty_ok):
            raise self.fail(mapping, key, keypath, f"expected a {'string' if empty_ok else 'non-empty string'}, "
                                                   f"got {describe_value(value)}")
        if choices and value not in choices:
            raise self.fail(mapping, key, keypath, f"{value!r} is not one of {'|'.join(choices)}")
        return value

    def name(self, mapping: LineMap, key: str, keypath: str, what: str) -> str:
        value = str(key) if mapping is None else self.string(mapping, key, keypath)
        if not NAME_PATTERN.match(value):
            raise self.fail(mapping, key, keypath, f"{what} {value!r} must be letters, digits, '_' or '-' "
                                                   "(starting with a letter or digit)")
        return value

    def number(self, mapping: LineMap, key: str, keypath: str, *, minimum: float = 0.0, strict: bool = False,
               integer: bool = False) -> float:
        value = mapping[key]
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "5e11" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise self.fail(mapping, key, keypath, f"expected a number, got {describe_value(mapping[key])}")
        if value < minimum or (strict and value == minimum):
            raise self.fail(mapping, key, keypath, f"must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
        if integer:
            if int(value) != value:
                raise self.fail(mapping, key, keypath, f"must be a whole number, got {value:g}")
            return int(value)
        return float(value)

    def boolean(self, mapping: LineMap, key: str, keypath: str) -> bool:
        value = mapping[key]
        if not isinstance(value, bool):
            raise self.fail(mapping, key, keypath, f"expected true or false, got {describe_value(value)}")
        return value

    def strings(self, mapping: LineMap, key: str, keypath: str) -> tuple[str, ...]:
        value = mapping[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise self.fail(mapping, key, keypath, f"expected a list of strings, got {describe_value(value)}")
        return tuple(str(v) for v in value)

    def path_value(self, mapping: LineMap, key: str, keypath: str, base: Path) -> str:
        """A path: ${VAR} expanded, made absolute against ``base`` (``hf:`` item sources kept)."""
        raw = expand_env(self.string(mapping, key, keypath), lambda msg: self.fail(mapping, key, keypath, msg))
        if raw.startswith("hf:"):
            return raw
        return str((base / os.path.expanduser(raw)).resolve())


def _substitute_study_dir(node: Any, study_dir: str) -> Any:
    """``{study_dir}`` in every string value (mapping keys untouched), in place for mappings."""
    if isinstance(node, dict):
        for key in node:
            node[key] = _substitute_study_dir(node[key], study_dir)
        return node
    if isinstance(node, list):
        return [_substitute_study_dir(item, study_dir) for item in node]
    if isinstance(node, str):
        return node.replace(STUDY_DIR_PLACEHOLDER, study_dir)
    return node


# ---------------------------------------------------------------------------------------------
# Loading

_TOP_KEYS = ("name", "description", "run", "mixture", "stages", "arm_stages", "axes", "exclude", "extra_arms",
             "prepare", "export", "eval", "posttrain", "comparisons", "replicate_axis", "local", "slurm")
_MIXTURE_KEYS = ("data_root", "valid_fraction", "max_epochs", "sources")
_STAGE_KEYS = ("kind", "tokens", "iterations", "seq_length", "global_batch_size", "rules", "continues", "run")
_CHANGE_KEYS = ("sources", "rules", "stages", "vars", "run", "description")
_VALUE_KEYS = ("label",) + _CHANGE_KEYS
_EXTRA_KEYS = ("from",) + _CHANGE_KEYS
_PREPARE_KEYS = ("id", "kind", "command")
_EVAL_KEYS = ("items", "split", "scoring", "prompt_style", "identity", "passage", "batch_size", "device",
              "posttrained", "capability", "variants")


def default_study_dir(study_path: str, name: Optional[str] = None) -> str:
    """Where a study is planned when ``--out`` is not given: ``runs/<study name>``."""
    return str(Path("runs", name or Path(study_path).stem).resolve())


def load_study(path: str, study_dir: Optional[str] = None) -> Study:
    """Read and validate a study file; ``study_dir`` (default ``runs/<name>``) fills ``{study_dir}``."""
    path = str(Path(path).resolve())
    document = load_yaml(path, "study", StudyError)
    if not isinstance(document, dict):
        raise StudyError(f"{path}: expected a mapping with 'stages' and 'axes', got {describe_value(document)}")
    r = _Reader(path)
    r.only_keys(document, _TOP_KEYS, "")
    for required in ("stages",):
        if required not in document:
            raise StudyError(f"{path}: missing top-level key '{required}'")
    name = r.name(document, "name", "name", "study name") if "name" in document else Path(path).stem
    study_dir = str(Path(study_dir).resolve()) if study_dir else default_study_dir(path, name)
    _substitute_study_dir(document, study_dir)
    base = Path(path).parent

    run = None
    if "run" in document and document["run"] is not None:
        value = document["run"]
        if isinstance(value, str):
            run_path = r.path_value(document, "run", "run", base)
            loaded = load_yaml(run_path, "run config", StudyError)
            if not isinstance(loaded, dict):
                raise StudyError(f"{run_path}: a run config must be a mapping, got {describe_value(loaded)}")
            _substitute_study_dir(loaded, study_dir)
            run = Overlay(loaded, run_path)
        else:
            run = Overlay(r.mapping(document, "run", "run"), path)

    mixture_map = r.mapping(document, "mixture", "mixture") if "mixture" in document else _empty()
    r.only_keys(mixture_map, _MIXTURE_KEYS, "mixture")
    mixture = {"data_root": (r.path_value(mixture_map, "data_root", "mixture.data_root", base)
                             if "data_root" in mixture_map else str(base))}
    if "valid_fraction" in mixture_map:
        mixture["valid_fraction"] = r.number(mixture_map, "valid_fraction", "mixture.valid_fraction")
    if "max_epochs" in mixture_map:
        mixture["max_epochs"] = r.number(mixture_map, "max_epochs", "mixture.max_epochs", strict=True)
    sources = r.mapping(mixture_map, "sources", "mixture.sources") if "sources" in mixture_map else _empty()
    _check_sources(r, sources, "mixture.sources", partial_ok=False)

    stages = _parse_stages(r, document)
    arm_stages = (r.strings(document, "arm_stages", "arm_stages") if "arm_stages" in document
                  else tuple(stages))
    for stage in arm_stages:
        if stage not in stages:
            raise r.fail(document, "arm_stages", "arm_stages", f"no stage {stage!r} (stages: {', '.join(stages)})")

    axes = _parse_axes(r, document, stages)
    exclude = _parse_exclude(r, document, axes)
    extra_arms = _parse_extra_arms(r, document, axes, stages)
    prepare = _parse_prepare(r, document)
    export = _parse_export(r, document)
    eval_spec = _parse_eval(r, document, base)
    posttrain = _parse_posttrain(r, document, base)
    comparisons = _parse_comparisons(r, document)
    replicate_axis = _parse_replicate_axis(r, document, axes)
    local = r.mapping(document, "local", "local") if "local" in document else _empty()
    r.only_keys(local, ("nproc",), "local")
    nproc = r.number(local, "nproc", "local.nproc", minimum=1, integer=True) if "nproc" in local else 1
    slurm = _parse_slurm(r, document, base)
    return Study(
        path=path, name=name,
        description=r.string(document, "description", "description", empty_ok=True) if "description" in document else "",
        study_dir=study_dir, run=run, mixture=mixture, sources=sources, stages=stages, arm_stages=arm_stages,
        axes=axes, exclude=exclude, extra_arms=extra_arms, prepare=prepare, export=export, eval=eval_spec,
        posttrain=posttrain, comparisons=comparisons, replicate_axis=replicate_axis, local_nproc=nproc, slurm=slurm,
        where={key: location(path, document, key) for key in document},
    )


def _empty() -> LineMap:
    mapping = LineMap()
    mapping.line, mapping.lines = 0, {}
    return mapping


def _check_sources(r: _Reader, sources: LineMap, keypath: str, partial_ok: bool) -> None:
    for source in sources:
        sub = f"{keypath}.{source}"
        r.name(None, str(source), sub, "source name")
        entry = sources[source]
        if entry is None and partial_ok:
            continue  # removes the source from the arm
        if not isinstance(entry, dict):
            raise r.fail(sources, source, sub, f"expected {{prefix: ..., category: ...}}, got {describe_value(entry)}")
        r.only_keys(entry, ("prefix", "category"), sub)
        for key in ("prefix", "category"):
            if key in entry:
                r.string(entry, key, f"{sub}.{key}")
            elif not partial_ok:
                raise r.fail(sources, source, sub, f"missing key '{key}'")


def _parse_stages(r: _Reader, document: LineMap) -> dict[str, StageSpec]:
    stages_map = r.mapping(document, "stages", "stages")
    if not stages_map:
        raise r.fail(document, "stages", "stages", "no stage defined")
    stages: dict[str, StageSpec] = {}
    for name in stages_map:
        keypath = f"stages.{name}"
        r.name(None, str(name), keypath, "stage name")
        entry = r.mapping(stages_map, name, keypath)
        r.only_keys(entry, _STAGE_KEYS, keypath)
        kind = (r.string(entry, "kind", f"{keypath}.kind", choices=TRAIN_KINDS) if "kind" in entry
                else str(name))
        if kind not in TRAIN_KINDS:
            raise r.fail(stages_map, name, keypath, f"stage {name!r} needs 'kind: {'|'.join(TRAIN_KINDS)}' "
                                                    "(only stages named like a kind may leave it out)")
        if "tokens" in entry and "iterations" in entry:
            raise r.fail(entry, "iterations", f"{keypath}.iterations", "give 'tokens' or 'iterations', not both")
        if "tokens" not in entry and "iterations" not in entry:
            raise r.fail(stages_map, name, keypath, "a stage needs a budget: 'tokens' or 'iterations'")
        shape = {}
        for key in ("seq_length", "global_batch_size"):
            if key not in entry:
                raise r.fail(stages_map, name, keypath, f"missing key '{key}' (the run config's "
                                                        f"train.{key} is derived from it)")
            shape[key] = r.number(entry, key, f"{keypath}.{key}", minimum=1, integer=True)
        rules = r.mapping(entry, "rules", f"{keypath}.rules") if "rules" in entry else _empty()
        continues = None
        if "continues" in entry:
            continues = r.string(entry, "continues", f"{keypath}.continues")
            if continues not in stages:
                raise r.fail(entry, "continues", f"{keypath}.continues",
                             f"continues {continues!r}, which is not an earlier stage "
                             f"(earlier: {', '.join(stages) or 'none'})")
        run = Overlay(r.mapping(entry, "run", f"{keypath}.run"), r.path) if "run" in entry else None
        stages[str(name)] = StageSpec(
            name=str(name), kind=kind,
            tokens=r.number(entry, "tokens", f"{keypath}.tokens", strict=True) if "tokens" in entry else None,
            iterations=(r.number(entry, "iterations", f"{keypath}.iterations", minimum=1, integer=True)
                        if "iterations" in entry else None),
            rules=rules, continues=continues, run=run, where=r.where(stages_map, name, keypath), **shape)
    return stages


def _parse_change(r: _Reader, entry: LineMap, keypath: str, stages: dict[str, StageSpec]) -> Contribution:
    sources = r.mapping(entry, "sources", f"{keypath}.sources") if "sources" in entry else _empty()
    _check_sources(r, sources, f"{keypath}.sources", partial_ok=True)
    rules: dict[str, LineMap] = {}
    if "rules" in entry:
        by_stage = r.mapping(entry, "rules", f"{keypath}.rules")
        for stage in by_stage:
            if stage not in stages:
                raise r.fail(by_stage, stage, f"{keypath}.rules.{stage}",
                             f"no stage {stage!r} (stages: {', '.join(stages)})")
            rules[str(stage)] = r.mapping(by_stage, stage, f"{keypath}.rules.{stage}")
    stage_list = None
    if "stages" in entry:
        stage_list = r.strings(entry, "stages", f"{keypath}.stages")
        for stage in stage_list:
            if stage not in stages:
                raise r.fail(entry, "stages", f"{keypath}.stages", f"no stage {stage!r} (stages: {', '.join(stages)})")
        if not stage_list:
            raise r.fail(entry, "stages", f"{keypath}.stages", "an arm needs at least one stage")
    variables = {}
    if "vars" in entry:
        vars_map = r.mapping(entry, "vars", f"{keypath}.vars")
        for var in vars_map:
            r.name(None, str(var), f"{keypath}.vars.{var}", "variable name")
            variables[str(var)] = r.string(vars_map, var, f"{keypath}.vars.{var}")
    run = Overlay(r.mapping(entry, "run", f"{keypath}.run"), r.path) if "run" in entry else None
    description = (r.string(entry, "description", f"{keypath}.description", empty_ok=True)
                   if "description" in entry else "")
    return Contribution(sources, rules, stage_list, variables, run, description, location(r.path, entry))


def _parse_axes(r: _Reader, document: LineMap, stages: dict[str, StageSpec]) -> dict[str, dict[str, AxisValue]]:
    if "axes" not in document or document["axes"] is None:
        return {}
    axes_map = r.mapping(document, "axes", "axes")
    axes: dict[str, dict[str, AxisValue]] = {}
    for axis in axes_map:
        keypath = f"axes.{axis}"
        r.name(None, str(axis), keypath, "axis name")
        values_map = r.mapping(axes_map, axis, keypath, empty_ok=False)
        if not values_map:
            raise r.fail(axes_map, axis, keypath, "an axis needs at least one value")
        values = {}
        for value in values_map:
            sub = f"{keypath}.{value}"
            r.name(None, str(value), sub, "axis value")
            entry = r.mapping(values_map, value, sub)
            r.only_keys(entry, _VALUE_KEYS, sub)
            label = r.string(entry, "label", f"{sub}.label", empty_ok=True) if "label" in entry else str(value)
            if label and not NAME_PATTERN.match(label):
                raise r.fail(entry, "label", f"{sub}.label", f"label {label!r} must be letters, digits, '_' or '-'")
            values[str(value)] = AxisValue(str(axis), str(value), label, _parse_change(r, entry, sub, stages))
        axes[str(axis)] = values
    return axes


def _parse_exclude(r: _Reader, document: LineMap, axes: dict) -> tuple[Exclusion, ...]:
    if "exclude" not in document or document["exclude"] is None:
        return ()
    items = document["exclude"]
    if not isinstance(items, list):
        raise r.fail(document, "exclude", "exclude", f"expected a list of {{axis: value}} mappings, "
                                                     f"got {describe_value(items)}")
    exclusions = []
    for index, entry in enumerate(items):
        keypath = f"exclude[{index}]"
        if not isinstance(entry, dict) or not entry:
            raise r.fail(document, "exclude", keypath, f"expected a mapping axis: value(s), got {describe_value(entry)}")
        match = {}
        for axis in entry:
            if axis not in axes:
                raise r.fail(entry, axis, f"{keypath}.{axis}", f"no axis {axis!r} (axes: {', '.join(axes)})")
            values = r.strings(entry, axis, f"{keypath}.{axis}")
            for value in values:
                if value not in axes[axis]:
                    raise r.fail(entry, axis, f"{keypath}.{axis}",
                                 f"axis {axis!r} has no value {value!r} (values: {', '.join(axes[axis])})")
            match[str(axis)] = values
        exclusions.append(Exclusion(match, location(r.path, entry)))
    return tuple(exclusions)


def _parse_extra_arms(r: _Reader, document: LineMap, axes: dict, stages: dict) -> tuple[ExtraArm, ...]:
    if "extra_arms" not in document or document["extra_arms"] is None:
        return ()
    arms_map = r.mapping(document, "extra_arms", "extra_arms")
    extras = []
    for name in arms_map:
        keypath = f"extra_arms.{name}"
        r.name(None, str(name), keypath, "arm name")
        entry = r.mapping(arms_map, name, keypath)
        r.only_keys(entry, _EXTRA_KEYS, keypath)
        values = {}
        if "from" in entry:
            start = r.mapping(entry, "from", f"{keypath}.from")
            for axis in start:
                if axis not in axes:
                    raise r.fail(start, axis, f"{keypath}.from.{axis}", f"no axis {axis!r} (axes: {', '.join(axes)})")
                value = r.string(start, axis, f"{keypath}.from.{axis}")
                if value not in axes[axis]:
                    raise r.fail(start, axis, f"{keypath}.from.{axis}",
                                 f"axis {axis!r} has no value {value!r} (values: {', '.join(axes[axis])})")
                values[str(axis)] = value
        missing = [axis for axis in axes if axis not in values]
        if missing:
            raise r.fail(arms_map, name, keypath, f"'from' must give a value for every axis (missing: "
                                                  f"{', '.join(missing)})")
        extras.append(ExtraArm(str(name), values, _parse_change(r, entry, keypath, stages)))
    return tuple(extras)


def _parse_prepare(r: _Reader, document: LineMap) -> tuple[PrepareJob, ...]:
    if "prepare" not in document or document["prepare"] is None:
        return ()
    items = document["prepare"]
    if not isinstance(items, list):
        raise r.fail(document, "prepare", "prepare", f"expected a list of {{id, kind, command}}, got {describe_value(items)}")
    jobs, seen = [], set()
    for index, entry in enumerate(items):
        keypath = f"prepare[{index}]"
        if not isinstance(entry, dict):
            raise r.fail(document, "prepare", keypath, f"expected a mapping {{id, kind, command}}, got {describe_value(entry)}")
        r.only_keys(entry, _PREPARE_KEYS, keypath)
        for key in ("id", "command"):
            if key not in entry:
                raise r.fail(entry, None, keypath, f"missing key '{key}'")
        job_id = r.name(entry, "id", f"{keypath}.id", "job id")
        if job_id in seen:
            raise r.fail(entry, "id", f"{keypath}.id", f"duplicate prepare id {job_id!r}")
        seen.add(job_id)
        kind = r.string(entry, "kind", f"{keypath}.kind", choices=("data",)) if "kind" in entry else "data"
        jobs.append(PrepareJob(job_id, kind, r.string(entry, "command", f"{keypath}.command"),
                               r.where(entry, None, keypath)))
    return tuple(jobs)


def _parse_export(r: _Reader, document: LineMap) -> ExportSpec:
    if "export" not in document or document["export"] is None:
        return ExportSpec()
    entry = r.mapping(document, "export", "export")
    r.only_keys(entry, ("dtype", "verify"), "export")
    return ExportSpec(
        dtype=r.string(entry, "dtype", "export.dtype", choices=EXPORT_DTYPES) if "dtype" in entry else "fp32",
        verify=r.boolean(entry, "verify", "export.verify") if "verify" in entry else None)


_VARIANT_KEYS = ("items", "split", "scoring", "prompt_style", "identity", "passage", "batch_size")


def _eval_settings(r: _Reader, entry: LineMap, keypath: str, base: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "items" in entry:
        values["items"] = r.path_value(entry, "items", f"{keypath}.items", base)
    if "split" in entry and entry["split"] is not None:
        values["split"] = r.string(entry, "split", f"{keypath}.split")
    for key, choices in (("scoring", SCORINGS), ("prompt_style", PROMPT_STYLES), ("identity", IDENTITIES),
                         ("passage", PASSAGES)):
        if key in entry:
            values[key] = r.string(entry, key, f"{keypath}.{key}", choices=choices)
    if "batch_size" in entry:
        values["batch_size"] = r.number(entry, "batch_size", f"{keypath}.batch_size", minimum=1, integer=True)
    return values


def _parse_eval(r: _Reader, document: LineMap, base: Path) -> EvalSpec:
    if "eval" not in document or document["eval"] is None:
        return EvalSpec()
    entry = r.mapping(document, "eval", "eval")
    r.only_keys(entry, _EVAL_KEYS, "eval")
    values = _eval_settings(r, entry, "eval", base)
    if "device" in entry:
        values["device"] = r.string(entry, "device", "eval.device")
    if "variants" in entry and entry["variants"] is not None:
        variants = r.mapping(entry, "variants", "eval.variants")
        values["variants"] = {}
        for name in variants:
            keypath = f"eval.variants.{name}"
            r.name(None, str(name), keypath, "variant name")
            if name == "posttrained":
                raise r.fail(variants, name, keypath, "'posttrained' names the post-trained models' eval; "
                                                      "choose another variant name")
            variant = r.mapping(variants, name, keypath)
            r.only_keys(variant, _VARIANT_KEYS, keypath)
            values["variants"][str(name)] = _eval_settings(r, variant, keypath, base)
    if "posttrained" in entry:
        post = r.mapping(entry, "posttrained", "eval.posttrained")
        r.only_keys(post, ("identity", "chat_template"), "eval.posttrained")
        if "identity" in post:
            values["posttrained_identity"] = r.string(post, "identity", "eval.posttrained.identity",
                                                      choices=IDENTITIES)
        if "chat_template" in post:
            values["posttrained_chat_template"] = r.string(post, "chat_template", "eval.posttrained.chat_template",
                                                           choices=CHAT_TEMPLATES)
    if "capability" in entry and entry["capability"] is not None:
        cap = r.mapping(entry, "capability", "eval.capability")
        r.only_keys(cap, ("tasks", "limit", "num_fewshot"), "eval.capability")
        if "tasks" not in cap:
            raise r.fail(entry, "capability", "eval.capability", "missing key 'tasks'")
        values["capability"] = CapabilitySpec(
            tasks=r.strings(cap, "tasks", "eval.capability.tasks"),
            limit=r.number(cap, "limit", "eval.capability.limit", strict=True) if "limit" in cap else None,
            num_fewshot=(r.number(cap, "num_fewshot", "eval.capability.num_fewshot", integer=True)
                         if "num_fewshot" in cap else None))
    return EvalSpec(**values)


def _parse_posttrain(r: _Reader, document: LineMap, base: Path) -> PosttrainSpec:
    if "posttrain" not in document or document["posttrain"] is None:
        return PosttrainSpec()
    entry = r.mapping(document, "posttrain", "posttrain")
    r.only_keys(entry, ("sft", "dpo"), "posttrain")
    sft = None
    if "sft" in entry:
        sft_map = r.mapping(entry, "sft", "posttrain.sft")
        r.only_keys(sft_map, ("run",), "posttrain.sft")
        sft = Overlay(r.mapping(sft_map, "run", "posttrain.sft.run") if "run" in sft_map else _empty(), r.path)
    dpo = None
    if "dpo" in entry:
        dpo_map = r.mapping(entry, "dpo", "posttrain.dpo")
        r.only_keys(dpo_map, ("config", "data", "args"), "posttrain.dpo")
        for key in ("config", "data"):
            if key not in dpo_map:
                raise r.fail(entry, "dpo", "posttrain.dpo", f"missing key '{key}'")
        dpo = DpoSpec(config=r.path_value(dpo_map, "config", "posttrain.dpo.config", base),
                      data=r.path_value(dpo_map, "data", "posttrain.dpo.data", base),
                      args=r.strings(dpo_map, "args", "posttrain.dpo.args") if "args" in dpo_map else ())
    return PosttrainSpec(sft, dpo)


def _parse_comparisons(r: _Reader, document: LineMap) -> Comparisons:
    if "comparisons" not in document or document["comparisons"] is None:
        return Comparisons()
    entry = r.mapping(document, "comparisons", "comparisons")
    r.only_keys(entry, ("baseline", "arms"), "comparisons")
    return Comparisons(
        baseline=r.string(entry, "baseline", "comparisons.baseline") if "baseline" in entry else None,
        arms=r.strings(entry, "arms", "comparisons.arms") if "arms" in entry else None,
        where=location(r.path, document, "comparisons"))


def _parse_replicate_axis(r: _Reader, document: LineMap, axes: dict) -> Optional[str]:
    if "replicate_axis" not in document or document["replicate_axis"] is None:
        return None
    axis = r.string(document, "replicate_axis", "replicate_axis")
    if axis not in axes:
        raise r.fail(document, "replicate_axis", "replicate_axis",
                     f"no axis {axis!r} (axes: {', '.join(axes) or 'none'})")
    return axis


def _parse_slurm(r: _Reader, document: LineMap, base: Path) -> SlurmSpec:
    if "slurm" not in document or document["slurm"] is None:
        return SlurmSpec()
    entry = r.mapping(document, "slurm", "slurm")
    r.only_keys(entry, ("options", "scripts"), "slurm")
    options = {}
    if "options" in entry:
        by_kind = r.mapping(entry, "options", "slurm.options")
        for kind in by_kind:
            if kind != "default" and kind not in JOB_KINDS:
                raise r.fail(by_kind, kind, f"slurm.options.{kind}",
                             f"unknown job kind (allowed: default, {', '.join(JOB_KINDS)})")
            options[str(kind)] = r.strings(by_kind, kind, f"slurm.options.{kind}")
    scripts = r.path_value(entry, "scripts", "slurm.scripts", base) if "scripts" in entry else None
    return SlurmSpec(options, scripts)
