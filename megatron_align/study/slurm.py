"""The SLURM executor: one ``sbatch --parsable`` per job, chained with ``--dependency=afterok``.

Scripts (``launch/slurm/`` of this checkout, or the study's ``slurm.scripts``):

- training jobs (pretrain / midtrain / cpt / sft): ``train.sbatch JOB_DIR/config.yaml`` (it requeues
  itself until the run has finished, keeping its SLURM job id, so ``afterok`` holds);
- export: ``export.sbatch <arguments of megatron-align export>``;
- eval: ``eval.sbatch <arguments of megatron-align eval>``;
- anything else (prepare jobs, DPO): ``job.sbatch --success-file JOB_DIR/success CMD...``.

In a plan, a dependency on a job not submitted yet is written as the shell variable that will
hold its id, ``afterok:${JOB_<id>}`` (``.`` in the id becomes ``__``, ``-`` becomes ``_``), so the
commands in plan order, each as ``JOB_<id>=$(sbatch ...)``, submit the study (``submit.sh`` in
the study dir is exactly that). ``study run --executor slurm`` submits the same commands with the
ids filled in, records each id in ``JOB_DIR/submitted.json``, and on a re-run submits only what is
neither done nor in the queue; a job waiting on a dependency that can never be satisfied (its
parent failed) is cancelled and submitted again behind the parent's new attempt.
"""
from __future__ import annotations

import getpass
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from .plan import placeholder
from .schema import TRAIN_KINDS, StudyError
from .state import (DONE, NEVER, QUEUED, RUNNING, SUCCESS_FILE, count_states, job_dir, job_states,
                    remove_marker, write_marker)

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "launch" / "slurm"


def scripts_dir(record: dict) -> Path:
    configured = record.get("slurm", {}).get("scripts")
    return Path(configured) if configured else SCRIPTS_DIR


def sbatch_argv(record: dict, job_id: str, dependencies: list[str]) -> list[str]:
    """The sbatch command for a job; ``dependencies`` are SLURM ids or ``${JOB_...}`` placeholders."""
    detail = record["job_details"][job_id]
    kind, argv = detail["kind"], detail["argv"]
    directory = job_dir(record, job_id)
    options = record.get("slurm", {}).get("options", {})
    command = ["sbatch", "--parsable", f"--job-name={record['study']['name']}.{job_id}",
               f"--chdir={record['study']['workdir']}", f"--output={directory / 'slurm-%j.out'}",
               "--open-mode=append"]
    if dependencies:
        command.append("--dependency=afterok:" + ":".join(dependencies))
    command += list(options.get("default", [])) + list(options.get(kind, []))
    scripts = scripts_dir(record)
    if kind in TRAIN_KINDS + ("sft",):
        command += [str(scripts / "train.sbatch"), argv[2]]
    elif kind == "export":
        command += [str(scripts / "export.sbatch"), *argv[2:]]
    elif kind == "eval":
        command += [str(scripts / "eval.sbatch"), *argv[2:]]
    else:
        command += [str(scripts / "job.sbatch"), "--success-file", str(directory / SUCCESS_FILE), *argv]
    return command


def planned_commands(record: dict) -> dict[str, str]:
    """Every job's sbatch line, dependencies as ``${JOB_<id>}`` placeholders."""
    commands = {}
    for job in record["jobs"]:
        argv = sbatch_argv(record, job["id"], [f"${{{placeholder(parent)}}}" for parent in job["after"]])
        # the dependency stays unquoted so that the shell fills in the ids
        commands[job["id"]] = " ".join(arg if arg.startswith("--dependency=") else shlex.quote(arg) for arg in argv)
    return commands


def submit_script(record: dict) -> str:
    """submit.sh: the plan's sbatch lines in order, each id kept for the jobs that run after it."""
    commands = planned_commands(record)
    lines = ["#!/bin/bash", f"# Submits study {record['study']['name']} (plan {record['plan_hash'][:12]}) in one go;",
             "# `megatron-align study run STUDY_DIR --executor slurm` does the same and can resume.", "set -euo pipefail"]
    for job in record["jobs"]:
        lines.append(f"{placeholder(job['id'])}=$({commands[job['id']]})")
    return "\n".join(lines) + "\n"


def squeue_jobs() -> Optional[dict[str, tuple[str, str]]]:
    """SLURM id -> (state, reason) for this user's jobs; None when squeue is not available."""
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    queue = {}
    for line in result.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            queue[parts[0]] = (parts[1], parts[2])
    return queue


def submit(record: dict, say: Callable[[str], None] = print) -> int:
    """Submit every job that is neither done nor queued/running; returns 0 or 2 (sbatch refused)."""
    if shutil.which("sbatch") is None:
        raise StudyError("--executor slurm: sbatch is not on PATH (run on a SLURM login node, or use "
                         "--executor local)")
    queue = squeue_jobs()
    if queue is None:
        raise StudyError("--executor slurm: squeue is not available, so the jobs already queued cannot be "
                         "told apart from missing ones; nothing submitted")
    states = job_states(record, queue)
    slurm_ids: dict[str, str] = {}
    submitted, kept = 0, 0
    for job in record["jobs"]:
        job_id, state = job["id"], states[job["id"]]
        marker_id = _submitted_id(record, job_id)
        if state.state == DONE:
            continue
        if state.state in (QUEUED, RUNNING):
            slurm_ids[job_id] = marker_id
            kept += 1
            continue
        if state.state == NEVER and marker_id in queue:
            subprocess.run(["scancel", marker_id], capture_output=True, text=True)
        dependencies = []
        for parent in job["after"]:
            if states[parent].state == DONE:
                continue
            if parent not in slurm_ids:
                raise StudyError(f"cannot submit {job_id}: {parent} is neither done nor submitted")
            dependencies.append(slurm_ids[parent])
        command = sbatch_argv(record, job_id, dependencies)
        job_dir(record, job_id).mkdir(parents=True, exist_ok=True)
        remove_marker(record, job_id, "failed.json")
        (job_dir(record, job_id) / SUCCESS_FILE).unlink(missing_ok=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            say(f"error: sbatch refused {job_id}: {result.stderr.strip() or result.stdout.strip()}")
            return 2
        slurm_id = result.stdout.strip().split(";")[0]
        write_marker(record, job_id, "submitted.json", slurm_id=slurm_id, command=shlex.join(command),
                     time=time.time())
        slurm_ids[job_id] = slurm_id
        submitted += 1
        say(f"submitted {job_id}: SLURM job {slurm_id}" + (f" (after {', '.join(dependencies)})"
                                                          if dependencies else ""))
    counts = count_states(job_states(record, squeue_jobs()))
    say(f"study {record['study']['name']}: {submitted} submitted, {kept} already queued or running; "
        + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    return 0


def _submitted_id(record: dict, job_id: str) -> str:
    from .state import read_marker

    marker = read_marker(record, job_id, "submitted.json")
    return str(marker["slurm_id"]) if marker else ""
