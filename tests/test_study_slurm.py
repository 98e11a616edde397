"""The study's SLURM executor against the real two-node cluster of `make slurm-local`.

One reduced study, two arms of a tiny GPT-NeoX (pretrain -> export -> eval each), submitted with
`study run --executor slurm` through launch/slurm/*.sbatch. The `aligned` arm reads a dataset that
does not exist yet, so its training job fails on the cluster: its export and eval must show as
never-started because of it in `study status` (text and --json), while the `baseline` chain runs to
done. Then the dataset appears and a second `study run` submits only the three missing jobs (the
waiting dependents of the failed one are cancelled and submitted again behind the new attempt),
and the re-submitted training job finishes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_align.study.plan import read_record
from megatron_align.study.slurm import squeue_jobs
from megatron_align.study.state import job_states
from test_study import build_tiny_data, tiny_study

pytestmark = [pytest.mark.slurm, pytest.mark.cpu_only(reason="CPU training jobs on the local cluster")]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds for one wait (every job starts a Python with torch: slow on a loaded machine)

ARMS = """\
    baseline: {}
    aligned:   # reads late_text_document, which the test writes only after the first submission
      sources: {al: {prefix: late_text_document, category: aligned_discourse}}
      rules: {pretrain: {aligned_discourse: {share: 0.25}}}
"""
CHAIN = ("pretrain", "export", "eval")


def _study(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_align.cli", "study", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _wait(out: Path, until, what: str) -> dict:
    """Poll the study's states (the library behind `study status`) until ``until(states)``."""
    record = read_record(out)
    deadline = time.time() + TIMEOUT
    while True:
        states = job_states(record, squeue_jobs())
        if until(states):
            return states
        if time.time() > deadline:
            raise AssertionError(f"{what}: not reached in {TIMEOUT} s: "
                                 + ", ".join(f"{j} {s.state} {s.reason}" for j, s in states.items()))
        time.sleep(2)


def _submitted(out: Path, job_id: str) -> str:
    return str(json.loads((out / "jobs" / job_id / "submitted.json").read_text())["slurm_id"])


def _scontrol(env: dict, slurm_id: str) -> dict:
    result = subprocess.run(["scontrol", "-o", "show", "job", slurm_id], env=env, capture_output=True, text=True)
    fields = {}
    for word in result.stdout.split():
        key, _, value = word.partition("=")
        fields.setdefault(key, value)
    return fields


def test_slurm_executor_runs_a_study_and_a_failed_job_leaves_its_dependents_never_started(
        slurm_cluster, tmp_path, monkeypatch):
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)  # squeue / scontrol from this process
    env = {**os.environ, **slurm_cluster, "MA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": slurm_cluster["MA_SLURM_LOCAL_IFNAME"],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    (tmp_path / "data").mkdir()
    data = build_tiny_data(tmp_path / "data")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(tiny_study(data, name="slurmstudy", iterations=6, axes=ARMS,
                                 eval_extra="  device: cpu\n"))
    out = tmp_path / "study"
    ids = [f"{arm}.{kind}" for arm in ("baseline", "aligned") for kind in CHAIN]
    first_ids: dict[str, str] = {}
    try:
        first = _study(env, "run", str(study_file), "--executor", "slurm", "--out", str(out))
        assert first.returncode == 0, first.stdout + first.stderr
        for job_id in ids:  # every job submitted, its SLURM id recorded, chained with afterok
            first_ids[job_id] = _submitted(out, job_id)
            assert f"submitted {job_id}: SLURM job {first_ids[job_id]}" in first.stdout
        for arm in ("baseline", "aligned"):
            for parent, child in zip(CHAIN, CHAIN[1:]):
                dependency = _scontrol(env, first_ids[f"{arm}.{child}"])["Dependency"]
                assert dependency.startswith(f"afterok:{first_ids[f'{arm}.{parent}']}"), dependency

        _wait(out, lambda s: s["aligned.pretrain"].state == "failed", "aligned.pretrain failed")
        status = _study(env, "status", str(out), "--json")
        assert status.returncode == 0, status.stderr
        jobs = {job["id"]: job for job in json.loads(status.stdout)["jobs"]}
        assert {j: jobs[j]["slurm_id"] for j in ids} == first_ids
        failed = jobs["aligned.pretrain"]
        assert failed["reason"].startswith(f"SLURM job {first_ids['aligned.pretrain']} left the queue unfinished")
        assert "late_text_document" in failed["reason"]  # the job's own error line, from its log
        assert jobs["aligned.export"]["state"] == "never-started"
        assert jobs["aligned.export"]["reason"].startswith("aligned.pretrain failed (SLURM job ")
        assert jobs["aligned.eval"]["state"] == "never-started"
        assert jobs["aligned.eval"]["reason"] == "aligned.export never started"
        # on the cluster, the failed job's dependent waits forever and never started
        export = _scontrol(env, first_ids["aligned.export"])
        assert (export["JobState"], export["Reason"], export["StartTime"]) == \
            ("PENDING", "DependencyNeverSatisfied", "Unknown")
        assert not list((out / "jobs" / "aligned.export").glob("slurm-*.out"))
        table = {line.split()[2]: line.split() for line in _study(env, "status", str(out)).stdout.splitlines()[1:]}
        assert table["aligned.export"][:2] + table["aligned.export"][3:5] == ["never-started", "export",
                                                                              "aligned.pretrain", "failed"]
        assert table["aligned.eval"][:2] + table["aligned.eval"][3:] == ["never-started", "eval", "aligned.export",
                                                                          "never", "started"]

        for suffix in (".bin", ".idx", ".stats.json"):  # the missing dataset appears
            shutil.copy(data / f"aligned_text_document{suffix}", data / f"late_text_document{suffix}")
        second = _study(env, "run", str(out), "--executor", "slurm")
        assert second.returncode == 0, second.stdout + second.stderr
        resubmitted = {line.split()[1].rstrip(":") for line in second.stdout.splitlines()
                       if line.startswith("submitted ")}
        assert resubmitted == {"aligned.pretrain", "aligned.export", "aligned.eval"}, second.stdout
        for job_id in ("baseline.pretrain", "baseline.export", "baseline.eval"):
            assert _submitted(out, job_id) == first_ids[job_id]  # kept, not submitted again
        new_ids = {job_id: _submitted(out, job_id) for job_id in resubmitted}
        assert not set(new_ids.values()) & set(first_ids.values())
        assert _scontrol(env, new_ids["aligned.export"])["Dependency"].startswith(
            f"afterok:{new_ids['aligned.pretrain']}")
        queue = squeue_jobs()
        assert first_ids["aligned.export"] not in queue and first_ids["aligned.eval"] not in queue  # cancelled

        states = _wait(out, lambda s: all(s[j].state == "done" for j in ("baseline.eval", "aligned.pretrain")),
                       "baseline chain and the re-submitted aligned.pretrain done")
        assert all(states[f"baseline.{kind}"].state == "done" for kind in CHAIN)
        assert json.loads((out / "jobs" / "aligned.pretrain" / "run" / "finished.json").read_text())["iteration"] == 6
        report = _study(env, "report", str(out), "--json")
        assert report.returncode == 0, report.stderr
        summary = json.loads(report.stdout)
        assert summary["arms"]["baseline"]["n_items"] == 8
        if states["aligned.eval"].state != "done":
            assert "aligned.eval" in summary["missing"]["aligned"]
    finally:
        submitted = [marker for marker in out.glob("jobs/*/submitted.json")]
        slurm_ids = {str(json.loads(path.read_text())["slurm_id"]) for path in submitted} | set(first_ids.values())
        if slurm_ids:
            subprocess.run(["scancel", *sorted(slurm_ids)], env=env, capture_output=True)
