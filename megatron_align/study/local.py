"""The local executor: a study's jobs on this machine, in plan (topological) order, N at a time.

Resumable: a job with ``done.json`` is skipped; every other job runs again, and a training job
that was interrupted resumes through the trainer's own resume because it reuses its run dir. A
job is done when it exits 0 *and* its outputs are complete (a training job stopped early by a
signal exits 0 but is not done). A failed job's dependents are not started; what does not depend
on it still runs, and the executor returns non-zero at the end.

``megatron-align`` / ``data-tools`` jobs run with the Python running the executor; prepare jobs
run under ``bash -c`` with that Python's ``bin/`` first on PATH. Each job's output goes to
``JOB_DIR/log.txt`` (appended, one header per attempt).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .schema import TRAIN_KINDS
from .state import (DONE, FAILED, NEVER, count_states, job_dir, job_states, outputs_complete, remove_marker,
                    write_marker)

_MODULES = {"megatron-align": "megatron_align.cli", "data-tools": "data_tools.cli"}
EXIT_JOBS_FAILED = 4  # some job failed (its dependents never started)
POLL_SECONDS = 0.2


def local_argv(record: dict, job_id: str) -> list[str]:
    """The argv the local executor runs for a job."""
    detail = record["job_details"][job_id]
    argv = list(detail["argv"])
    if argv[0] in _MODULES:
        argv = [sys.executable, "-m", _MODULES[argv[0]], *argv[1:]]
    nproc = record.get("local", {}).get("nproc", 1)
    if detail["kind"] in TRAIN_KINDS + ("sft",) and nproc > 1:
        argv += ["--nproc", str(nproc)]
    return argv


def local_command(record: dict, job_id: str) -> str:
    """The job's command line as `study plan` prints it for the local executor."""
    import shlex

    detail = record["job_details"][job_id]
    argv = detail["argv"]
    if argv[:2] == ["bash", "-c"]:
        return argv[2]
    nproc = record.get("local", {}).get("nproc", 1)
    extra = ["--nproc", str(nproc)] if detail["kind"] in TRAIN_KINDS + ("sft",) and nproc > 1 else []
    return shlex.join([*argv, *extra])


@dataclass
class _Running:
    job_id: str
    process: subprocess.Popen
    started: float
    log: object
    terminated: bool = False


class LocalExecutor:
    def __init__(self, record: dict, jobs: int = 1, say: Callable[[str], None] = print):
        self.record = record
        self.max_jobs = max(1, jobs)
        self.say = say
        self.order = [job["id"] for job in record["jobs"]]
        self.after = {job["id"]: job["after"] for job in record["jobs"]}
        self.running: dict[str, _Running] = {}
        self.stop_signal: Optional[int] = None
        self.env = dict(os.environ)
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.env.setdefault("OMP_NUM_THREADS", "1")

    def run(self) -> int:
        states = job_states(self.record)
        status = {job_id: (DONE if state.state == DONE else "todo") for job_id, state in states.items()}
        reasons: dict[str, str] = {}
        todo = [j for j in self.order if status[j] != DONE]
        total = len(self.order)
        self.say(f"study {self.record['study']['name']}: {total} jobs, {total - len(todo)} already done, "
                 f"{len(todo)} to run, {self.max_jobs} at a time (logs: "
                 f"{job_dir(self.record, '<job>')}/log.txt)")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                if self.stop_signal is None:
                    for job_id in self._ready(status):
                        if len(self.running) >= self.max_jobs:
                            break
                        self._start(job_id)
                        status[job_id] = "running"
                        self._progress(status, f"started  {job_id}")
                if not self.running:
                    break
                finished = self._wait_any()
                for job_id, code in finished:
                    ok, reason = self._finish(job_id, code)
                    status[job_id] = DONE if ok else FAILED
                    if ok:
                        self._progress(status, f"done     {job_id}")
                    else:
                        reasons[job_id] = reason
                        self._progress(status, f"FAILED   {job_id}: {reason}")
                        for blocked in self._dependents(job_id):
                            if status[blocked] == "todo":
                                status[blocked] = NEVER
                                reasons[blocked] = f"{job_id} failed"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._summary(status, reasons)

    # --- scheduling ---------------------------------------------------------------------------

    def _ready(self, status: dict) -> list[str]:
        return [j for j in self.order if status[j] == "todo" and all(status[p] == DONE for p in self.after[j])]

    def _dependents(self, job_id: str) -> list[str]:
        found, frontier = [], [job_id]
        while frontier:
            parent = frontier.pop()
            for child in self.order:
                if parent in self.after[child] and child not in found:
                    found.append(child)
                    frontier.append(child)
        return found

    def _start(self, job_id: str) -> None:
        directory = job_dir(self.record, job_id)
        directory.mkdir(parents=True, exist_ok=True)
        argv = local_argv(self.record, job_id)
        log = open(directory / "log.txt", "a", buffering=1)
        attempt = _attempts(directory / "log.txt") + 1
        log.write(f"=== study run: attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  f"$ {local_command(self.record, job_id)}\n")
        log.flush()
        remove_marker(self.record, job_id, "failed.json")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=self.record["study"]["workdir"], env=self.env)
        import psutil

        write_marker(self.record, job_id, "running.json", pid=process.pid, host=socket.gethostname(),
                     pid_started=psutil.Process(process.pid).create_time(), started=time.time(),
                     attempt=attempt)
        self.running[job_id] = _Running(job_id, process, time.time(), log)

    def _wait_any(self) -> list[tuple[str, int]]:
        while True:
            finished = [(job_id, run.process.poll()) for job_id, run in self.running.items()]
            finished = [(job_id, code) for job_id, code in finished if code is not None]
            if finished:
                return finished
            if self.stop_signal is not None:
                self._stop_children()
            time.sleep(POLL_SECONDS)

    def _finish(self, job_id: str, code: int) -> tuple[bool, str]:
        run = self.running.pop(job_id)
        seconds = time.time() - run.started
        if code == 0:
            complete, why = outputs_complete(self.record, job_id)
            if complete or not self.record["job_details"][job_id]["outputs"]:  # prepare jobs: the exit code
                run.log.write(f"=== study run: done in {seconds:.1f}s\n")
                run.log.close()
                write_marker(self.record, job_id, "done.json", executor="local", exit_code=0,
                             seconds=seconds, time=time.time())
                remove_marker(self.record, job_id, "running.json")
                return True, ""
            reason = f"exited 0 but is not finished: {why}"
        elif code < 0:
            reason = f"killed by signal {-code}"
        else:
            reason = f"exit code {code}"
        reason += f"; log: {job_dir(self.record, job_id) / 'log.txt'}"
        run.log.write(f"=== study run: failed after {seconds:.1f}s ({reason})\n")
        run.log.close()
        write_marker(self.record, job_id, "failed.json", executor="local", exit_code=code, reason=reason,
                     seconds=seconds, time=time.time())
        remove_marker(self.record, job_id, "running.json")
        return False, reason

    # --- signals ------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.say(f"study run: {signal.Signals(signum).name}: stopping the running jobs (training jobs "
                     "save a checkpoint) and starting no new one")
        self.stop_signal = signum

    def _stop_children(self) -> None:
        """SIGTERM to every running job's process tree, once: the trainer saves and exits."""
        import psutil

        for run in self.running.values():
            if run.terminated:
                continue
            run.terminated = True
            try:
                parent = psutil.Process(run.process.pid)
                for process in [parent, *parent.children(recursive=True)]:
                    process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass

    # --- output -------------------------------------------------------------------------------

    def _progress(self, status: dict, event: str) -> None:
        done = sum(1 for s in status.values() if s == DONE)
        failed = sum(1 for s in status.values() if s == FAILED)
        self.say(f"[{done:>{len(str(len(status)))}}/{len(status)} done, {len(self.running)} running, "
                 f"{failed} failed] {event}")

    def _summary(self, status: dict, reasons: dict) -> int:
        counts = count_states(job_states(self.record))
        line = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        self.say(f"study {self.record['study']['name']}: {line}")
        for job_id in self.order:
            if status[job_id] in (FAILED, NEVER):
                self.say(f"  {status[job_id]:<13} {job_id}: {reasons.get(job_id, '')}")
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        if any(s in (FAILED, NEVER) for s in status.values()):
            return EXIT_JOBS_FAILED
        return 0


def _attempts(log_path) -> int:
    try:
        with open(log_path, errors="replace") as handle:
            return sum(1 for line in handle if line.startswith("=== study run: attempt "))
    except FileNotFoundError:
        return 0


def run_local(record: dict, jobs: int = 1, say: Callable[[str], None] = print) -> int:
    """Run every job not done yet; 0 when all are done, EXIT_JOBS_FAILED when some failed."""
    return LocalExecutor(record, jobs, say).run()
