"""The mixture YAML as typed dataclasses, with errors that name the file, line and key.

A mixture names its sources (megatron indexed-dataset prefixes, each tagged with a category) and,
per training stage, a budget and one rule per category::

    data_root: ${MEGATRON_ALIGN_DATA:-data}    # optional; relative paths are relative to this file
    seq_length: 2048                           # optional defaults for every stage
    global_batch_size: 2048
    valid_fraction: 0.01                       # documents of every source held out for validation
    sources:
      web:     {prefix: web_text_document, category: base}
      aligned: {prefix: aligned_text_document, category: aligned_discourse}
    stages:
      pretrain:
        tokens: 5.0e8                          # or iterations: N (global_batch_size from above)
        rules:
          base: natural
          aligned_discourse: {share: 0.01, window: {last: 0.1}}
      cpt:
        continues: pretrain                    # shared sources go on where pretrain stopped
        tokens: 5.0e7
        rules:
          base: natural

Rules: ``natural`` (share the tokens the other rules leave, in proportion to source size),
``share`` (fraction of the stage's tokens, spread over the window), ``window_share`` (fraction of
the tokens inside the window), ``upsample`` (k times the category's natural share, inside the
window) and ``tokens`` (an absolute count, spread over the window). Windows: ``whole`` (default),
``{first: f}``, ``{last: f}`` (fractions of the stage's steps) or ``{steps: [a, b]}`` (steps
``a <= step < b``).

``continues: STAGE`` (in a stage, or in one rule for that category's sources) makes the stage read
each source it shares with the earlier stage ``STAGE`` from where that stage's sample stream
stopped, instead of reshuffling it (see ``plan.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from megatron_align.config.yaml_lines import (ConfigError, LineMap, describe_value, expand_env, load_yaml,
                                              location)

RULE_KINDS = ("natural", "share", "window_share", "upsample", "tokens")
WINDOW_KINDS = ("whole", "first", "last", "steps")
DEFAULT_MAX_EPOCHS = 4.0


class MixtureError(ConfigError):
    """A bad mixture: the message names the YAML file, line and key."""


# ---------------------------------------------------------------------------------------------
# Typed mixture


@dataclass(frozen=True)
class Window:
    kind: str  # whole | first | last | steps
    start: Union[int, float, None] = None  # first/last: the fraction; steps: first step
    end: Union[int, float, None] = None  # steps: one past the last step
    where: str = ""

    def step_range(self, iterations: int) -> tuple[int, int]:
        """The window as ``[start, end)`` steps of a stage with ``iterations`` steps."""
        if self.kind == "whole":
            return 0, iterations
        if self.kind == "first":
            return 0, int(round(self.start * iterations))
        if self.kind == "last":
            return iterations - int(round(self.start * iterations)), iterations
        return int(self.start), int(self.end)

    def describe(self) -> str:
        if self.kind == "whole":
            return "whole"
        if self.kind == "steps":
            return f"steps [{self.start}, {self.end})"
        return f"{self.kind} {self.start:g}"


WHOLE = Window("whole")


@dataclass(frozen=True)
class Rule:
    category: str
    kind: str  # one of RULE_KINDS
    value: Optional[float]  # None for natural
    window: Window = WHOLE
    where: str = ""
    continues: Optional[str] = None  # the earlier stage whose stream this category's sources continue
    continues_where: str = ""

    def describe(self) -> str:
        text = self.kind if self.value is None else f"{self.kind} {self.value:g}"
        return text if self.window.kind == "whole" else f"{text}, {self.window.describe()}"


@dataclass(frozen=True)
class Source:
    name: str
    prefix: str  # absolute path prefix of PREFIX.bin / PREFIX.idx / PREFIX.stats.json
    category: str
    where: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    rules: tuple[Rule, ...]
    tokens: Optional[float] = None
    iterations: Optional[int] = None
    global_batch_size: Optional[int] = None
    seq_length: Optional[int] = None
    where: str = ""
    budget_where: str = ""
    continues: Optional[str] = None  # the earlier stage whose streams the shared sources continue
    continues_where: str = ""

    def rule_for(self, category: str) -> Optional[Rule]:
        return next((rule for rule in self.rules if rule.category == category), None)

    def continuation(self, category: str) -> tuple[Optional[str], str]:
        """(earlier stage, file:line of the key) that ``category``'s sources continue, if any;
        a rule's ``continues`` wins over the stage's."""
        rule = self.rule_for(category)
        if rule is not None and rule.continues is not None:
            return rule.continues, rule.continues_where
        return self.continues, self.continues_where


@dataclass(frozen=True)
class Mixture:
    path: str
    sources: tuple[Source, ...]
    stages: dict[str, Stage]
    seq_length: Optional[int] = None
    global_batch_size: Optional[int] = None
    valid_fraction: float = 0.0
    max_epochs: float = DEFAULT_MAX_EPOCHS
    name: str = ""
    description: str = ""
    where: dict[str, str] = field(default_factory=dict)  # top-level key -> "file:line"

    @property
    def categories(self) -> list[str]:
        """Every category, in the order sources first name them."""
        return list(dict.fromkeys(source.category for source in self.sources))

    def stage(self, name: Optional[str]) -> Stage:
        if name is None:
            if len(self.stages) == 1:
                return next(iter(self.stages.values()))
            raise MixtureError(f"{self.path}: stages: the mixture has stages {sorted(self.stages)}; "
                               "choose one")
        if name not in self.stages:
            raise MixtureError(f"{self.path}: stages: no stage {name!r} (stages: {', '.join(self.stages)})")
        return self.stages[name]


class _Reader:
    """Validation helpers that turn problems into ``file:line: key.path: message``."""

    def __init__(self, path: str):
        self.path = path

    def where(self, mapping: Any, key: Optional[str], keypath: str) -> str:
        return f"{location(self.path, mapping, key)}: {keypath}"

    def fail(self, mapping: Any, key: Optional[str], keypath: str, message: str) -> MixtureError:
        return MixtureError(f"{self.where(mapping, key, keypath)}: {message}")

    def mapping(self, parent: Any, key: str, keypath: str) -> LineMap:
        value = parent[key]
        if not isinstance(value, dict):
            raise self.fail(parent, key, keypath, f"expected a mapping, got {describe_value(value)}")
        return value

    def only_keys(self, mapping: LineMap, allowed: tuple[str, ...], keypath: str) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.fail(mapping, key, f"{keypath}.{key}" if keypath else str(key),
                                f"unknown key (allowed: {', '.join(allowed)})")

    def number(self, mapping: LineMap, key: str, keypath: str, *, minimum: float = 0.0,
               maximum: Optional[float] = None, strict: bool = False, integer: bool = False) -> float:
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "5e8" (no dot) as a string; accept anything float() takes.
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise self.fail(mapping, key, keypath, f"expected a number, got {value!r}") from None
            else:
                raise self.fail(mapping, key, keypath, f"expected a number, got {describe_value(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise self.fail(mapping, key, keypath, f"expected a finite number, got {value}")
        if value < minimum or (strict and value == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise self.fail(mapping, key, keypath, f"must be {bound}, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.fail(mapping, key, keypath, f"must be <= {maximum:g}, got {value:g}")
        if integer:
            if float(value) != int(value):
                raise self.fail(mapping, key, keypath, f"must be a whole number, got {value:g}")
            return int(value)
        return float(value)

    def string(self, mapping: LineMap, key: str, keypath: str) -> str:
        value = mapping[key]
        if not isinstance(value, str) or not value:
            raise self.fail(mapping, key, keypath, f"expected a non-empty string, got {describe_value(value)}")
        return value


# ---------------------------------------------------------------------------------------------
# Loading


_TOP_KEYS = ("name", "description", "data_root", "seq_length", "global_batch_size", "valid_fraction",
             "max_epochs", "sources", "stages")
_SOURCE_KEYS = ("prefix", "category")
_STAGE_KEYS = ("tokens", "iterations", "global_batch_size", "seq_length", "continues", "rules")


def load_mixture(path: Union[str, os.PathLike]) -> Mixture:
    """Read and validate a mixture YAML (schema only; the data files are checked at resolve time)."""
    path = str(path)
    document = load_yaml(path, "mixture", MixtureError)
    return parse_mixture(document, path)


def parse_mixture(document: Any, path: str) -> Mixture:
    r = _Reader(path)
    if not isinstance(document, dict):
        raise MixtureError(f"{path}: expected a mapping with 'sources' and 'stages', got {describe_value(document)}")
    r.only_keys(document, _TOP_KEYS, "")
    for required in ("sources", "stages"):
        if required not in document:
            raise MixtureError(f"{path}: missing top-level key '{required}'")

    base_dir = Path(path).resolve().parent
    data_root = base_dir
    if "data_root" in document:
        raw = expand_env(r.string(document, "data_root", "data_root"),
                           lambda msg: r.fail(document, "data_root", "data_root", msg))
        data_root = (base_dir / os.path.expanduser(raw)).resolve()

    seq_length = (r.number(document, "seq_length", "seq_length", minimum=1, integer=True)
                  if "seq_length" in document else None)
    global_batch_size = (r.number(document, "global_batch_size", "global_batch_size", minimum=1, integer=True)
                         if "global_batch_size" in document else None)
    valid_fraction = (r.number(document, "valid_fraction", "valid_fraction", maximum=0.5)
                      if "valid_fraction" in document else 0.0)
    max_epochs = (r.number(document, "max_epochs", "max_epochs", minimum=0, strict=True)
                  if "max_epochs" in document else DEFAULT_MAX_EPOCHS)

    sources = _parse_sources(r, document, data_root)
    known_categories = list(dict.fromkeys(source.category for source in sources))
    stages_map = r.mapping(document, "stages", "stages")
    if not stages_map:
        raise r.fail(document, "stages", "stages", "no stage defined")
    stages = {}
    for name in stages_map:
        stages[str(name)] = _parse_stage(r, stages_map, str(name), known_categories)
    _check_continuations(stages, sources)

    return Mixture(
        path=path,
        sources=tuple(sources),
        stages=stages,
        seq_length=seq_length,
        global_batch_size=global_batch_size,
        valid_fraction=valid_fraction,
        max_epochs=max_epochs,
        name=str(document.get("name", Path(path).stem)),
        description=str(document.get("description", "")),
        where={key: r.where(document, key, key) for key in document},
    )


def _parse_sources(r: _Reader, document: LineMap, data_root: Path) -> list[Source]:
    sources_map = r.mapping(document, "sources", "sources")
    if not sources_map:
        raise r.fail(document, "sources", "sources", "no source defined")
    sources = []
    for name in sources_map:
        keypath = f"sources.{name}"
        entry = r.mapping(sources_map, name, keypath)
        r.only_keys(entry, _SOURCE_KEYS, keypath)
        for required in _SOURCE_KEYS:
            if required not in entry:
                raise r.fail(sources_map, name, keypath, f"missing key '{required}'")
        raw_prefix = expand_env(r.string(entry, "prefix", f"{keypath}.prefix"),
                                  lambda msg: r.fail(entry, "prefix", f"{keypath}.prefix", msg))
        prefix = str((data_root / os.path.expanduser(raw_prefix)).resolve())
        for suffix in (".bin", ".idx"):
            if raw_prefix.endswith(suffix):
                raise r.fail(entry, "prefix", f"{keypath}.prefix",
                             f"give the prefix without {suffix} (got {raw_prefix!r})")
        category = r.string(entry, "category", f"{keypath}.category")
        sources.append(Source(str(name), prefix, category, r.where(sources_map, name, keypath)))
    return sources


def _parse_stage(r: _Reader, stages_map: LineMap, name: str, known_categories: list[str]) -> Stage:
    keypath = f"stages.{name}"
    entry = r.mapping(stages_map, name, keypath)
    r.only_keys(entry, _STAGE_KEYS, keypath)
    if "tokens" in entry and "iterations" in entry:
        raise r.fail(entry, "iterations", f"{keypath}.iterations",
                     "give the budget as 'tokens' or as 'iterations', not both")
    tokens = (r.number(entry, "tokens", f"{keypath}.tokens", minimum=0, strict=True)
              if "tokens" in entry else None)
    iterations = (r.number(entry, "iterations", f"{keypath}.iterations", minimum=1, integer=True)
                  if "iterations" in entry else None)
    gbs = (r.number(entry, "global_batch_size", f"{keypath}.global_batch_size", minimum=1, integer=True)
           if "global_batch_size" in entry else None)
    seq = (r.number(entry, "seq_length", f"{keypath}.seq_length", minimum=1, integer=True)
           if "seq_length" in entry else None)
    if "rules" not in entry:
        raise r.fail(stages_map, name, keypath, "missing key 'rules'")
    rules_map = r.mapping(entry, "rules", f"{keypath}.rules")
    if not rules_map:
        raise r.fail(entry, "rules", f"{keypath}.rules", "no rule defined")
    rules = []
    for category in rules_map:
        rules.append(_parse_rule(r, rules_map, str(category), f"{keypath}.rules.{category}", known_categories))
    budget_key = "tokens" if "tokens" in entry else "iterations" if "iterations" in entry else None
    continues = r.string(entry, "continues", f"{keypath}.continues") if "continues" in entry else None
    return Stage(
        name=name, rules=tuple(rules), tokens=tokens, iterations=iterations, global_batch_size=gbs,
        seq_length=seq, where=r.where(stages_map, name, keypath),
        budget_where=r.where(entry, budget_key, f"{keypath}.{budget_key}") if budget_key else
        r.where(stages_map, name, keypath),
        continues=continues,
        continues_where=r.where(entry, "continues", f"{keypath}.continues") if continues else "",
    )


def _parse_rule(r: _Reader, rules_map: LineMap, category: str, keypath: str,
                known_categories: list[str]) -> Rule:
    if category not in known_categories:
        raise r.fail(rules_map, category, keypath,
                     f"unknown category {category!r} (sources define: {', '.join(known_categories)})")
    where = r.where(rules_map, category, keypath)
    value = rules_map[category]
    if value == "natural":
        return Rule(category, "natural", None, WHOLE, where)
    if not isinstance(value, dict):
        raise r.fail(rules_map, category, keypath,
                     f"expected 'natural' or a mapping with one of {', '.join(RULE_KINDS)}, got {describe_value(value)}")
    r.only_keys(value, RULE_KINDS + ("window", "continues"), keypath)
    kinds = [key for key in value if key in RULE_KINDS]
    if len(kinds) != 1:
        raise r.fail(rules_map, category, keypath,
                     f"give exactly one of {', '.join(RULE_KINDS)} (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    rule_keypath = f"{keypath}.{kind}"
    if kind == "natural":
        if value[kind] is not True:
            raise r.fail(value, kind, rule_keypath, "write 'natural: true' (or the rule 'natural')")
        number = None
    elif kind in ("share", "window_share"):
        number = r.number(value, kind, rule_keypath, minimum=0, maximum=1)
    elif kind == "upsample":
        number = r.number(value, kind, rule_keypath, minimum=0)
    else:
        number = r.number(value, kind, rule_keypath, minimum=0)
    window = _parse_window(r, value, f"{keypath}.window") if "window" in value else WHOLE
    if kind == "window_share" and window.kind == "whole":
        raise r.fail(value, kind, rule_keypath, "window_share needs a window (use share for the whole stage)")
    continues = r.string(value, "continues", f"{keypath}.continues") if "continues" in value else None
    continues_where = r.where(value, "continues", f"{keypath}.continues") if continues else ""
    return Rule(category, kind, number, window, where, continues, continues_where)


def _check_continuations(stages: dict[str, Stage], sources: list[Source]) -> None:
    """``continues`` names an earlier stage that reads the sources in question. Stages run in the
    order they are written, so a later stage (or the stage itself) is refused, which also rules
    out cycles."""
    order = list(stages)
    for position, stage in enumerate(stages.values()):
        named = [(stage.continues, stage.continues_where, None)] if stage.continues else []
        named += [(rule.continues, rule.continues_where, rule.category) for rule in stage.rules if rule.continues]
        for earlier, where, category in named:
            if earlier not in stages:
                raise MixtureError(f"{where}: no stage {earlier!r} (stages: {', '.join(order)})")
            if earlier == stage.name:
                raise MixtureError(f"{where}: a stage cannot continue itself")
            if order.index(earlier) > position:
                cycle = _continuation_cycle(stages, earlier, stage.name)
                raise MixtureError(
                    f"{where}: stage {earlier!r} comes after {stage.name!r} in the mixture; a stage can "
                    f"only continue an earlier one (stages run in the order they are written)"
                    + (f"; this is a cycle: {' -> '.join([stage.name, *cycle])}" if cycle else ""))
            other = stages[earlier]
            if category is not None:
                if other.rule_for(category) is None:
                    raise MixtureError(f"{where}: stage {earlier!r} reads no {category!r} source "
                                       f"(its rules: {', '.join(r.category for r in other.rules)})")
            elif not _shared_sources(stage, other, sources):
                raise MixtureError(
                    f"{where}: stage {earlier!r} reads none of the sources of stage {stage.name!r} "
                    f"({earlier}: {', '.join(r.category for r in other.rules)}; "
                    f"{stage.name}: {', '.join(r.category for r in stage.rules)})")


def _shared_sources(stage: Stage, other: Stage, sources: list[Source]) -> list[str]:
    return [s.name for s in sources if stage.rule_for(s.category) and other.rule_for(s.category)]


def _continuation_cycle(stages: dict[str, Stage], start: str, back_to: str) -> list[str]:
    """The stages from ``start`` following ``continues`` keys back to ``back_to``, or []."""
    path, seen, current = [start], {start}, start
    while current != back_to:
        stage = stages[current]
        targets = [stage.continues] + [rule.continues for rule in stage.rules]
        nxt = next((t for t in targets if t == back_to), None) or next(
            (t for t in targets if t in stages and t not in seen), None)
        if nxt is None:
            return []
        path.append(nxt)
        seen.add(nxt)
        current = nxt
    return path


def _parse_window(r: _Reader, parent: LineMap, keypath: str) -> Window:
    value = parent["window"]
    where = r.where(parent, "window", keypath)
    if value == "whole":
        return Window("whole", where=where)
    if not isinstance(value, dict) or len(value) != 1:
        raise r.fail(parent, "window", keypath,
                     "expected 'whole', {first: f}, {last: f} or {steps: [a, b]}, got " + describe_value(value))
    r.only_keys(value, WINDOW_KINDS[1:], keypath)
    kind = next(iter(value))
    if kind in ("first", "last"):
        fraction = r.number(value, kind, f"{keypath}.{kind}", minimum=0, maximum=1, strict=True)
        return Window(kind, fraction, None, where)
    steps = value[kind]
    if (not isinstance(steps, list) or len(steps) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps)):
        raise r.fail(value, kind, f"{keypath}.steps", f"expected [first_step, end_step] (integers), got {describe_value(steps)}")
    start, end = steps
    if start < 0 or end <= start:
        raise r.fail(value, kind, f"{keypath}.steps", f"need 0 <= first_step < end_step, got [{start}, {end}]")
    return Window("steps", start, end, where)
