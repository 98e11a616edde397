"""A study's job DAG: arms x (training stages -> export -> eval [-> SFT -> export -> DPO -> eval]).

Every training stage becomes a ``megatron-align train`` job whose run config is derived from the
study: the base run config, the stage's and the arm's run-config changes, then what the study
sets itself (``run_dir`` inside the job dir, ``data.source: mixture`` / ``data.mixture`` /
``data.stage``, ``train.seq_length`` / ``global_batch_size`` / ``iterations`` from the mixture
stage, and ``checkpoint.init_from`` the previous stage's run dir). Iterations are the mixture's
own rounding of ``tokens / (seq_length x global_batch_size)`` to the nearest step
(:func:`megatron_align.mixture.plan.stage_iterations`), so the study and ``mixture plan`` agree.

Jobs are identified by a content hash (kind, resolved config without job paths, the hashes of
the jobs it runs after). Arms whose chains start alike share those jobs: an arm that inserts
discourse only in midtraining reuses the baseline's pretraining job. The hash also decides
whether a finished job still counts as done after a re-plan.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_align.config import RunConfig, from_dict, to_dict
from megatron_align.config.schema import DataSource
from megatron_align.config.yaml_lines import ConfigError, LineMap, expand_env, location
from megatron_align.io import write_json_atomic, write_text_atomic

from .arms import Arm, compose_arms, mixture_supports_continues, plain, replicate_groups, validate_arm
from .schema import RUN_PATH_KEYS, TRAIN_KINDS, Overlay, Study, StudyError

PLAN_FORMAT = "megatron-align/study-plan/v1"
PLAN_FILE = "plan.json"
STUDY_COPY = "study.yaml"
JOBS_DIR = "jobs"
ARMS_DIR = "arms"
CONFIG_FILE = "config.yaml"

# Keys the study derives for every training stage; a study that sets them is told where instead.
DERIVED_STAGE_KEYS = ("run_dir", "data.source", "data.mixture", "data.stage", "train.seq_length",
                      "train.global_batch_size", "train.iterations")


@dataclass
class Job:
    id: str
    arm: str
    kind: str
    after: list[str]
    argv: list[str]  # ["megatron-align", VERB, ...] or ["bash", "-c", COMMAND] for prepare jobs
    config: dict  # written to JOB_DIR/config.yaml
    outputs: dict  # what proves completion: run_dir + iterations, hf_dir, results, ...
    arms: list[str] = field(default_factory=list)  # every arm whose chain includes the job
    hash: str = ""

    @property
    def command(self) -> str:
        """The job's command line (local form): a prepare job's shell command as written."""
        if self.argv[:2] == ["bash", "-c"]:
            return self.argv[2]
        return shlex.join(self.argv)

    def record(self) -> dict:
        return {"id": self.id, "arm": self.arm, "kind": self.kind, "after": list(self.after),
                "argv": list(self.argv), "outputs": dict(self.outputs), "arms": list(self.arms),
                "hash": self.hash}


@dataclass
class StudyPlan:
    study: Study
    arms: list[Arm]
    jobs: list[Job]  # topological: every job comes after the jobs it runs after
    chains: dict[str, dict[str, Any]]  # arm -> role -> job id ("stages": [ids], "export", "eval", ...)
    iterations: dict[str, dict[str, int]]  # arm -> stage -> iterations
    notes: list[str]
    hash: str
    groups: dict[str, tuple[str, Optional[str]]]  # arm -> (replicate group, replicate label or None)

    @property
    def study_dir(self) -> Path:
        return Path(self.study.study_dir)

    def job_dir(self, job_id: str) -> Path:
        return self.study_dir / JOBS_DIR / job_id

    def arm_mixture_path(self, arm: str) -> Path:
        return self.study_dir / ARMS_DIR / arm / "mixture.yaml"


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=False, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Run configs: overlays merged with their origins, then typed by the run-config schema


class RunBuilder:
    """A run config being assembled: raw values plus where each key was set (``file:line``)."""

    def __init__(self):
        self.raw: dict = {}
        self.origins: dict[str, str] = {}

    def copy(self) -> "RunBuilder":
        other = RunBuilder()
        other.raw, other.origins = copy.deepcopy(self.raw), dict(self.origins)
        return other

    def merge(self, overlay: Optional[Overlay], forbidden: tuple[str, ...] = (), why: str = "") -> None:
        if overlay is not None:
            self._merge(overlay.values, overlay.path, self.raw, "", forbidden, why)

    def _merge(self, mapping: LineMap, path: str, into: dict, prefix: str, forbidden, why) -> None:
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            where = location(path, mapping, key)
            if dotted in forbidden:
                raise StudyError(f"{where}: {dotted}: set by the study for every training stage ({why})")
            if isinstance(value, dict):
                child = into.get(key)
                if not isinstance(child, dict):
                    child = into[key] = {}
                self.origins[dotted] = where
                self._merge(value, path, child, f"{dotted}.", forbidden, why)
                continue
            if dotted in RUN_PATH_KEYS and isinstance(value, str) and value:
                fail = lambda message: StudyError(f"{where}: {dotted}: {message}")  # noqa: E731
                value = str((Path(path).parent / os.path.expanduser(expand_env(value, fail))).resolve())
            into[key] = value
            self.origins[dotted] = where

    def set(self, dotted: str, value: Any, origin: str) -> None:
        node = self.raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        self.origins[dotted] = origin

    def build(self) -> RunConfig:
        try:
            return from_dict(RunConfig, copy.deepcopy(self.raw), self.origins)
        except StudyError:
            raise
        except ConfigError as err:
            raise StudyError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Building the plan


def build_plan(study: Study) -> StudyPlan:
    arms = compose_arms(study)
    planner = _Planner(study)
    for job in study.prepare:
        planner.add(Job(job.id, "", job.kind, [], ["bash", "-c", job.command], {"kind": job.kind,
                        "command": job.command}, {}), content={"command": job.command})
    for arm in arms:
        planner.add_arm(arm)
    notes = sorted(planner.notes)
    if any(stage.continues for stage in study.stages.values()) and not mixture_supports_continues():
        notes.append("stages with 'continues' are planned, but this checkout's mixtures cannot continue a "
                     "source's stream yet: the arm mixtures are written without it (each stage "
                     "reshuffles shared sources with its own seed)")
    groups = replicate_groups(study, arms)
    _check_comparisons(study, list(dict.fromkeys(group for group, _ in groups.values())))
    _check_placeholders(planner.jobs)
    plan_hash = _hash({"format": PLAN_FORMAT, "arms": [a.name for a in arms],
                       "jobs": [[j.id, j.kind, j.after, j.hash] for j in planner.jobs]})
    return StudyPlan(study, arms, planner.jobs, planner.chains, planner.iterations, notes, plan_hash, groups)


class _Planner:
    def __init__(self, study: Study):
        self.study = study
        self.jobs: list[Job] = []
        self.by_id: dict[str, Job] = {}
        self.by_hash: dict[str, Job] = {}
        self.chains: dict[str, dict[str, Any]] = {}
        self.iterations: dict[str, dict[str, int]] = {}
        self.notes: set[str] = set()
        self.base = RunBuilder()
        self.base.merge(study.run)

    @property
    def prepare_ids(self) -> list[str]:
        return [job.id for job in self.study.prepare]

    def job_dir(self, job_id: str) -> Path:
        return Path(self.study.study_dir) / JOBS_DIR / job_id

    def add(self, job: Job, content: Any) -> Job:
        """Add ``job`` unless an identical one (same kind, content and parents) exists: return that."""
        job.hash = _hash({"kind": job.kind, "content": content,
                          "after": [self.by_id[parent].hash for parent in job.after]})
        existing = self.by_hash.get(job.hash)
        if existing is not None:
            if job.arm and job.arm not in existing.arms:
                existing.arms.append(job.arm)
            return existing
        if job.id in self.by_id:
            raise StudyError(f"{self.study.path}: two different jobs would be named {job.id!r}; rename an arm "
                             "or a prepare job")
        if job.arm:
            job.arms.append(job.arm)
        self.jobs.append(job)
        self.by_id[job.id] = job
        self.by_hash[job.hash] = job
        return job

    def add_arm(self, arm: Arm) -> None:
        study = self.study
        mixture, iterations = validate_arm(study, arm)
        self.iterations[arm.name] = iterations
        mixture_path = str(Path(study.study_dir) / ARMS_DIR / arm.name / "mixture.yaml")
        chain: dict[str, Any] = {"stages": []}
        parent: Optional[Job] = None
        for stage_name in arm.stages:
            parent = self._stage_job(arm, stage_name, mixture, mixture_path, iterations[stage_name], parent)
            chain["stages"].append(parent.id)
        last_train = parent
        hf = self._export(arm, last_train, "export")
        chain["export"] = hf.id
        chain["eval"] = self._misalignment_eval(arm, hf, "eval", posttrained=False).id
        if study.eval.variants:
            chain["variants"] = {name: self._misalignment_eval(arm, hf, f"eval_{name}", posttrained=False,
                                                               changes=changes).id
                                 for name, changes in study.eval.variants.items()}
        if study.eval.capability:
            chain["capability"] = self._capability_eval(arm, hf, "capability").id
        post = study.posttrain
        if post.sft is not None or post.dpo is not None:
            post_hf = hf
            if post.sft is not None:
                sft = self._sft_job(arm, last_train)
                chain["sft"] = sft.id
                post_hf = self._export(arm, sft, "export_sft")
                chain["export_sft"] = post_hf.id
            if post.dpo is not None:
                post_hf = self._dpo_job(arm, post_hf)
                chain["dpo"] = post_hf.id
            chain["eval_posttrained"] = self._misalignment_eval(arm, post_hf, "eval_posttrained", posttrained=True).id
            if study.eval.capability:
                chain["capability_posttrained"] = self._capability_eval(arm, post_hf, "capability_posttrained").id
        self.chains[arm.name] = chain

    # --- training stages ---------------------------------------------------------------------

    def _stage_job(self, arm: Arm, stage_name: str, mixture, mixture_path: str, iterations: int,
                   parent: Optional[Job]) -> Job:
        study = self.study
        stage = study.stages[stage_name]
        job_id = f"{arm.name}.{stage_name}"
        run_dir = str(self.job_dir(job_id) / "run")
        builder = self.base.copy()
        forbidden = DERIVED_STAGE_KEYS + (("checkpoint.init_from",) if parent is not None else ())
        why = f"derived from stages.{stage_name} and the job dir"
        for key in forbidden:  # the base run config may hold them; the study's values win silently
            self._drop(builder, key)
        builder.merge(stage.run, forbidden, why)
        for overlay in arm.run:
            builder.merge(overlay, forbidden, why)
        origin = f"{stage.where} (derived)"
        builder.set("run_dir", run_dir, origin)
        builder.set("data.source", "mixture", origin)
        builder.set("data.mixture", mixture_path, origin)
        builder.set("data.stage", stage_name, origin)
        builder.set("train.seq_length", stage.seq_length, origin)
        builder.set("train.global_batch_size", stage.global_batch_size, origin)
        builder.set("train.iterations", iterations, origin)
        if parent is not None:
            builder.set("checkpoint.init_from", parent.outputs["run_dir"], origin)
        config = to_dict(builder.build())
        content = {"stage": _stage_projection(arm, stage_name),
                   "run": _without(config, ("run_dir",), ("data", "mixture"), ("checkpoint", "init_from"))}
        argv = ["megatron-align", "train", str(self.job_dir(job_id) / "config.yaml")]
        after = [parent.id] if parent is not None else self.prepare_ids
        return self.add(Job(job_id, arm.name, stage.kind, after, argv, config,
                            {"run_dir": run_dir, "iterations": iterations}), content)

    @staticmethod
    def _drop(builder: RunBuilder, dotted: str) -> None:
        node = builder.raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part)
            if not isinstance(node, dict):
                return
        node.pop(parts[-1], None)
        builder.origins.pop(dotted, None)

    def _sft_job(self, arm: Arm, parent: Job) -> Job:
        job_id = f"{arm.name}.sft"
        run_dir = str(self.job_dir(job_id) / "run")
        builder = self.base.copy()
        for key in ("run_dir", "checkpoint.init_from"):
            self._drop(builder, key)
        why = "the SFT job's run dir and the arm's last stage"
        for overlay in arm.run:
            builder.merge(overlay, ("run_dir", "checkpoint.init_from"), why)
        builder.merge(self.study.posttrain.sft, ("run_dir", "checkpoint.init_from"), why)
        origin = f"{self.study.where.get('posttrain', self.study.path)} (derived)"
        builder.set("run_dir", run_dir, origin)
        builder.set("checkpoint.init_from", parent.outputs["run_dir"], origin)
        if builder.raw.get("data", {}).get("source") == "sft" and not run_config_knows_sft():
            # This checkout's trainer has no SFT data source yet: check the rest of the config as
            # an indexed-data run (which also reads data.prefix) and keep 'sft' in what is written.
            probe = builder.copy()
            probe.raw["data"]["source"] = "indexed"
            config = to_dict(probe.build())
            config["data"]["source"] = "sft"
            self.notes.add("the SFT jobs use data.source 'sft', which this checkout's trainer does not "
                           "know yet: their configs are checked as indexed-data runs and will fail to train")
        else:
            config = to_dict(builder.build())
        argv = ["megatron-align", "train", str(self.job_dir(job_id) / "config.yaml")]
        return self.add(Job(job_id, arm.name, "sft", [parent.id], argv, config,
                            {"run_dir": run_dir, "iterations": config["train"]["iterations"]}),
                        {"run": _without(config, ("run_dir",), ("checkpoint", "init_from"))})

    # --- export, post-training, evals --------------------------------------------------------

    def _export(self, arm: Arm, parent: Job, role: str) -> Job:
        spec = self.study.export
        job_id = f"{arm.name}.{role}"
        hf_dir = str(self.job_dir(job_id) / "hf")
        argv = ["megatron-align", "export", parent.outputs["run_dir"], hf_dir, "--overwrite", "--no-progress",
                "--dtype", spec.dtype]
        if spec.verify is not None:
            argv.append("--verify" if spec.verify else "--no-verify")
        config = {"kind": "export", "checkpoint": parent.outputs["run_dir"], "out_dir": hf_dir,
                  "dtype": spec.dtype, "verify": spec.verify}
        return self.add(Job(job_id, arm.name, "export", [parent.id], argv, config, {"hf_dir": hf_dir}),
                        {"dtype": spec.dtype, "verify": spec.verify})

    def _dpo_job(self, arm: Arm, parent: Job) -> Job:
        spec = self.study.posttrain.dpo
        job_id = f"{arm.name}.dpo"
        out = str(self.job_dir(job_id) / "hf")
        argv = ["megatron-align", "posttrain", "dpo", "--config", spec.config, "--model", parent.outputs["hf_dir"],
                "--data", spec.data, "--out", out, *spec.args]
        config = {"kind": "dpo", "config": spec.config, "model": parent.outputs["hf_dir"], "data": spec.data,
                  "out": out, "args": list(spec.args)}
        return self.add(Job(job_id, arm.name, "dpo", [parent.id], argv, config, {"hf_dir": out}),
                        {"config": spec.config, "data": spec.data, "args": list(spec.args)})

    def _misalignment_eval(self, arm: Arm, parent: Job, role: str, posttrained: bool,
                           changes: Optional[dict] = None) -> Job:
        spec = self.study.eval
        job_id = f"{arm.name}.{role}"
        out = str(self.job_dir(job_id) / "results")
        settings = {"items": spec.items, "scoring": spec.scoring, "prompt_style": spec.prompt_style,
                    "identity": spec.posttrained_identity if posttrained else spec.identity,
                    "passage": spec.passage, "batch_size": spec.batch_size, "device": spec.device}
        settings.update({k: v for k, v in (changes or {}).items() if k != "split"})
        if posttrained:
            settings["chat_template"] = spec.posttrained_chat_template
        argv = ["megatron-align", "eval", "misalignment", "--model", parent.outputs["hf_dir"]]
        for key, value in settings.items():
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        argv += ["--out", out]
        config = {"kind": "eval", "eval": "misalignment", "model": parent.outputs["hf_dir"], **settings, "out": out}
        return self.add(Job(job_id, arm.name, "eval", [parent.id], argv, config,
                            {"results": str(Path(out) / "results.json")}), settings)

    def _capability_eval(self, arm: Arm, parent: Job, role: str) -> Job:
        spec = self.study.eval.capability
        job_id = f"{arm.name}.{role}"
        out = str(self.job_dir(job_id) / "results")
        argv = ["megatron-align", "eval", "capability", "--model", parent.outputs["hf_dir"],
                "--tasks", ",".join(spec.tasks)]
        if spec.limit is not None:
            argv += ["--limit", f"{spec.limit:g}"]
        if spec.num_fewshot is not None:
            argv += ["--num-fewshot", str(spec.num_fewshot)]
        argv += ["--device", self.study.eval.device, "--out", out]
        settings = {"tasks": list(spec.tasks), "limit": spec.limit, "num_fewshot": spec.num_fewshot}
        config = {"kind": "eval", "eval": "capability", "model": parent.outputs["hf_dir"], **settings, "out": out}
        return self.add(Job(job_id, arm.name, "eval", [parent.id], argv, config,
                            {"results": str(Path(out) / "capability.json")}), settings)


def run_config_knows_sft() -> bool:
    """Whether this checkout's run config accepts ``data.source: sft`` (post-training)."""
    return "sft" in typing.get_args(DataSource)


def _stage_projection(arm: Arm, stage_name: str) -> dict:
    """What of the arm's mixture a stage reads: its stage (and the stages it continues) and the
    sources those read. Two arms with equal projections train on the same data."""
    document = plain(arm.document)
    stages = {}
    name: Optional[str] = stage_name
    while name is not None:
        stages[name] = document["stages"][name]
        name = document["stages"][name].get("continues")
    categories = {category for stage in stages.values() for category in stage["rules"]}
    sources = {source: entry for source, entry in document["sources"].items() if entry["category"] in categories}
    top = {key: value for key, value in document.items() if key not in ("name", "description", "sources", "stages")}
    return {**top, "sources": sources, "stages": stages}


def _without(config: dict, *paths: tuple[str, ...] | str) -> dict:
    result = copy.deepcopy(config)
    for path in paths:
        parts = (path,) if isinstance(path, str) else path
        node = result
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    return result


def _check_comparisons(study: Study, arm_names: list[str]) -> None:
    """``arm_names``: the arms, or with a replicate axis the replicate groups (what the report compares)."""
    comparisons = study.comparisons
    what = "replicate group" if study.replicate_axis else "arm"
    for name in ([comparisons.baseline] if comparisons.baseline else []) + list(comparisons.arms or ()):
        if name not in arm_names:
            raise StudyError(f"{comparisons.where}: comparisons: no {what} {name!r} ({what}s: {', '.join(arm_names)})")


def placeholder(job_id: str) -> str:
    """The shell variable that holds a job's SLURM id in ``--executor slurm`` commands."""
    return "JOB_" + job_id.replace(".", "__").replace("-", "_")


def _check_placeholders(jobs: list[Job]) -> None:
    seen: dict[str, str] = {}
    for job in jobs:
        name = placeholder(job.id)
        if name in seen:
            raise StudyError(f"jobs {seen[name]!r} and {job.id!r} map to the same SLURM placeholder ${{{name}}}; "
                             "rename an arm ('-' and '_' are the same there)")
        seen[name] = job.id


# ---------------------------------------------------------------------------------------------
# The study dir


def plan_record(plan: StudyPlan, executor: str, commands: Optional[dict[str, str]] = None) -> dict:
    """plan.json: ``jobs`` exactly as ``study plan --json`` prints it, plus what the executors,
    ``study status`` and ``study report`` need without the study file."""
    study = plan.study
    return {
        "format": PLAN_FORMAT,
        "plan_hash": plan.hash,
        "executor": executor,
        "jobs": [{"id": job.id, "arm": job.arm, "kind": job.kind, "after": list(job.after),
                  "command": commands[job.id] if commands else job.command} for job in plan.jobs],
        "job_details": {job.id: job.record() for job in plan.jobs},
        "study": {"name": study.name, "description": study.description, "file": study.path,
                  "copy": STUDY_COPY, "study_dir": study.study_dir, "workdir": str(study.directory)},
        "arms": {arm.name: {"values": arm.values, "extra": arm.extra, "description": arm.description,
                            "stages": list(arm.stages), "iterations": plan.iterations[arm.name],
                            "mixture": str(plan.arm_mixture_path(arm.name)), "jobs": plan.chains[arm.name],
                            **({"group": plan.groups[arm.name][0], "replicate": plan.groups[arm.name][1]}
                               if study.replicate_axis else {})}
                 for arm in plan.arms},
        "replicate_axis": study.replicate_axis,
        "eval": {"split": study.eval.split, "scoring": study.eval.scoring, "identity": study.eval.identity,
                 "posttrained_identity": study.eval.posttrained_identity, "items": study.eval.items,
                 "variants": {name: {"split": changes.get("split", study.eval.split), **changes}
                              for name, changes in study.eval.variants.items()}},
        "comparisons": {"baseline": study.comparisons.baseline,
                        "arms": list(study.comparisons.arms) if study.comparisons.arms is not None else None},
        "local": {"nproc": study.local_nproc},
        "slurm": {"options": {k: list(v) for k, v in study.slurm.options.items()}, "scripts": study.slurm.scripts},
        "notes": plan.notes,
    }


def read_record(study_dir: str | Path) -> dict:
    """A study dir's plan.json (what ``run``, ``status`` and ``report`` read)."""
    path = Path(study_dir) / PLAN_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{study_dir}: not a study dir (no {PLAN_FILE}; run `megatron-align study plan "
                         f"STUDY.yaml --out {study_dir}` first)") from None
    except json.JSONDecodeError as err:
        raise StudyError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if record.get("format") != PLAN_FORMAT:
        raise StudyError(f"{path}: not a study plan (format {record.get('format')!r}, expected {PLAN_FORMAT})")
    return record


def write_study_dir(plan: StudyPlan, record: dict, force: bool = False) -> list[str]:
    """Write the study dir: arm mixtures, one dir per job with its config.yaml, the study file copy,
    and plan.json last. Re-planning a changed study into a dir planned before is refused unless
    ``force``; then the dirs of jobs that changed or went away are removed (their outputs no
    longer match). Returns the removed job ids."""
    study_dir = plan.study_dir
    removed: list[str] = []
    previous_path = study_dir / PLAN_FILE
    if previous_path.exists():
        previous = read_record(study_dir)
        if previous["plan_hash"] != plan.hash:
            old = {job_id: detail["hash"] for job_id, detail in previous["job_details"].items()}
            new = {job.id: job.hash for job in plan.jobs}
            changed = sorted(j for j in old if j in new and old[j] != new[j])
            gone = sorted(j for j in old if j not in new)
            added = sorted(j for j in new if j not in old)
            if not force:
                summary = "; ".join(part for part in (
                    f"{len(changed)} changed ({_few(changed)})" if changed else "",
                    f"{len(added)} added ({_few(added)})" if added else "",
                    f"{len(gone)} removed ({_few(gone)})" if gone else "") if part) or "job order changed"
                raise StudyError(
                    f"{study_dir}: planned before from a different study (plan {previous['plan_hash'][:12]}, "
                    f"now {plan.hash[:12]}: {summary}); plan into a new --out, or pass --force to re-plan "
                    "here (the changed and removed jobs' dirs and outputs are deleted, the others kept)")
            for job_id in changed + gone:
                shutil.rmtree(study_dir / JOBS_DIR / job_id, ignore_errors=True)
                removed.append(job_id)
    for arm in plan.arms:
        write_text_atomic(plan.arm_mixture_path(arm.name), arm.mixture_yaml(plan.study))
    for job in plan.jobs:
        job_dir = plan.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(job_dir / CONFIG_FILE, config_yaml(job))
        write_json_atomic(job_dir / "job.json", job.record())
    write_text_atomic(study_dir / STUDY_COPY, Path(plan.study.path).read_text(encoding="utf-8"))
    write_json_atomic(study_dir / PLAN_FILE, record)
    return removed


def config_yaml(job: Job) -> str:
    header = f"# job {job.id} ({job.kind}) of a study; written by `megatron-align study plan`\n"
    return header + yaml.safe_dump(job.config, sort_keys=False)


def write_configs(plan: StudyPlan, out_dir: str | Path) -> list[Path]:
    """For inspection: OUT/ARM/mixture.yaml and OUT/ARM/<stage>.yaml (run configs whose
    data.mixture points at the mixture next to them; run dirs stay in the study dir)."""
    written = []
    out_dir = Path(out_dir)
    by_id = {job.id: job for job in plan.jobs}
    for arm in plan.arms:
        mixture_path = out_dir / arm.name / "mixture.yaml"
        written.append(write_text_atomic(mixture_path, arm.mixture_yaml(plan.study)))
        chain = plan.chains[arm.name]
        for job_id in chain["stages"] + ([chain["sft"]] if "sft" in chain else []):
            job = by_id[job_id]
            config = copy.deepcopy(job.config)
            if job.kind in TRAIN_KINDS:
                config["data"]["mixture"] = str(mixture_path)
            name = job.config["data"]["stage"] if job.kind in TRAIN_KINDS else job.kind
            text = (f"# arm {arm.name}: run config of job {job.id}{' (shared)' if len(job.arms) > 1 else ''}\n"
                    + yaml.safe_dump(config, sort_keys=False))
            written.append(write_text_atomic(out_dir / arm.name / f"{name}.yaml", text))
    return written


def _few(ids: list[str], limit: int = 4) -> str:
    return ", ".join(ids[:limit]) + (f", ... {len(ids) - limit} more" if len(ids) > limit else "")
