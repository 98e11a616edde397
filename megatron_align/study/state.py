"""Where each job of a study stands, read from its job dir (and ``squeue`` for SLURM jobs).

Markers in ``JOB_DIR`` (each written atomically, each carrying the job's hash so that a re-planned
job whose content changed does not count as done):

- ``done.json``      the job finished: exit 0 and its outputs complete (a training job reached its
                     last step). Finished jobs are never run again.
- ``running.json``   a local executor started it (pid, host); stale when that process is gone.
- ``failed.json``    the last attempt failed (exit code or why), and when.
- ``submitted.json`` the SLURM executor submitted it (SLURM job id).

States: ``done``, ``running``, ``queued`` (SLURM: waiting in the queue), ``pending`` (not started
yet), ``failed``, ``never-started`` (a job it runs after failed or will never start) and
``submitted`` (SLURM, when ``squeue`` cannot be asked).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_align.io import write_json_atomic

from .plan import JOBS_DIR
from .schema import TRAIN_KINDS

DONE, RUNNING, QUEUED, PENDING, FAILED, NEVER, SUBMITTED = (
    "done", "running", "queued", "pending", "failed", "never-started", "submitted")
STATES = (DONE, RUNNING, QUEUED, SUBMITTED, PENDING, FAILED, NEVER)
SUCCESS_FILE = "success"  # written by launch/slurm/job.sbatch --success-file after exit 0


@dataclass
class JobState:
    state: str
    reason: str = ""


def job_dir(record: dict, job_id: str) -> Path:
    return Path(record["study"]["study_dir"]) / JOBS_DIR / job_id


def read_marker(record: dict, job_id: str, name: str) -> Optional[dict]:
    """A marker of the job's current hash (None when absent, unreadable or from another plan)."""
    path = job_dir(record, job_id) / name
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if marker.get("hash") != record["job_details"][job_id]["hash"]:
        return None
    return marker


def write_marker(record: dict, job_id: str, name: str, **fields) -> None:
    detail = record["job_details"][job_id]
    write_json_atomic(job_dir(record, job_id) / name, {"id": job_id, "hash": detail["hash"], **fields})


def remove_marker(record: dict, job_id: str, name: str) -> None:
    try:
        os.unlink(job_dir(record, job_id) / name)
    except FileNotFoundError:
        pass


def outputs_complete(record: dict, job_id: str) -> tuple[bool, str]:
    """Whether the job's outputs prove it finished (independently of how it was run)."""
    detail = record["job_details"][job_id]
    outputs = detail["outputs"]
    if detail["kind"] in TRAIN_KINDS + ("sft",):
        from megatron_align.checkpoint.files import latest_iteration

        iteration = latest_iteration(Path(outputs["run_dir"]) / "checkpoints") or 0
        if iteration >= outputs["iterations"]:
            return True, ""
        return False, f"stopped at step {iteration} of {outputs['iterations']}" + (
            " (resumes from its checkpoint)" if iteration else "")
    if "hf_dir" in outputs:
        if (Path(outputs["hf_dir"]) / "config.json").is_file():
            return True, ""
        return False, f"no {outputs['hf_dir']}/config.json"
    if "results" in outputs:
        if Path(outputs["results"]).is_file():
            return True, ""
        return False, f"no {outputs['results']}"
    if (job_dir(record, job_id) / SUCCESS_FILE).is_file():
        return True, ""
    return False, "no success marker"


def process_alive(marker: dict) -> bool:
    """Whether the process a running.json names still runs (same host, pid and start time)."""
    if marker.get("host") != socket.gethostname():
        return True  # another machine's executor: trust it
    import psutil

    try:
        process = psutil.Process(int(marker["pid"]))
        return abs(process.create_time() - float(marker.get("pid_started", 0))) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


def job_states(record: dict, queue: Optional[dict[str, tuple[str, str]]] = None) -> dict[str, JobState]:
    """The state of every job, in plan order. ``queue``: SLURM id -> (state, reason) from squeue
    (None: squeue was not asked). SLURM jobs that left the queue with complete outputs are marked
    done here (their own scripts cannot write the study's markers)."""
    states: dict[str, JobState] = {}
    for job in record["jobs"]:
        job_id = job["id"]
        states[job_id] = _own_state(record, job_id, queue)
    for job in record["jobs"]:  # plan order is topological: parents are final before children
        state = states[job["id"]]
        if state.state not in (PENDING, QUEUED, NEVER):
            continue
        blocked = [parent for parent in job["after"] if states[parent].state in (FAILED, NEVER)]
        if blocked:
            parent = blocked[0]
            why = "failed" if states[parent].state == FAILED else "never started"
            states[job["id"]] = JobState(NEVER, f"{parent} {why}" + (f" ({states[parent].reason})"
                                                                     if states[parent].state == FAILED else ""))
    return states


def _own_state(record: dict, job_id: str, queue: Optional[dict]) -> JobState:
    if read_marker(record, job_id, "done.json") is not None:
        return JobState(DONE)
    running = read_marker(record, job_id, "running.json")
    if running is not None and process_alive(running):
        return JobState(RUNNING, f"pid {running['pid']} since {_clock(running.get('started'))}")
    submitted = read_marker(record, job_id, "submitted.json")
    failed = read_marker(record, job_id, "failed.json")
    if submitted is not None and (failed is None or failed.get("time", 0) < submitted.get("time", 0)):
        slurm_id = str(submitted["slurm_id"])
        if queue is None:
            return JobState(SUBMITTED, f"SLURM job {slurm_id} (squeue not available)")
        if slurm_id in queue:
            slurm_state, reason = queue[slurm_id]
            if reason == "DependencyNeverSatisfied":
                return JobState(NEVER, f"SLURM job {slurm_id}: dependency never satisfied")
            state = RUNNING if slurm_state in ("RUNNING", "COMPLETING") else QUEUED
            return JobState(state, f"SLURM job {slurm_id} {slurm_state}" + (f" ({reason})" if reason not in
                                                                           ("None", "") else ""))
        complete, why = outputs_complete(record, job_id)
        if complete:
            write_marker(record, job_id, "done.json", executor="slurm", slurm_id=slurm_id, time=time.time())
            return JobState(DONE)
        log = job_dir(record, job_id) / f"slurm-{slurm_id}.out"
        error = last_error_line(log)
        return JobState(FAILED, f"SLURM job {slurm_id} left the queue unfinished ({why})"
                        + (f": {error}" if error else "") + f"; log {log}")
    if failed is not None:
        return JobState(FAILED, failed.get("reason", "failed"))
    return JobState(PENDING)


def last_error_line(log: Path, limit: int = 300) -> str:
    """The last ``error:`` line of a job's log (the project's one-line errors), shortened; "" if none."""
    try:
        with open(log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 200_000))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    errors = [line.strip() for line in lines if line.lstrip().lower().startswith("error:")]
    if not errors:
        return ""
    return errors[-1] if len(errors[-1]) <= limit else errors[-1][:limit - 3] + "..."


def _clock(timestamp) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(timestamp))) if timestamp else "?"


def count_states(states: dict[str, JobState]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for state in states.values():
        counts[state.state] += 1
    return counts
