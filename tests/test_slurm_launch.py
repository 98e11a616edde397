"""launch/slurm/*.sbatch submitted to a real two-node SLURM on this machine (`make slurm-local`).

Every job is submitted at once, at the start: the cluster runs them side by side while the
direct `megatron-align train` they are compared with runs here. One run config (a tiny
GPT-NeoX on synthetic data, with a recorded tokenizer so that it can be exported and evaluated)
serves every comparison:

- a train job, preempted once with SIGUSR1 (`scancel --signal=USR1 --batch`, as
  `--signal=B:USR1@SECS` sends it), saves, requeues itself, resumes, loses no step and ends
  with the direct run's run dir (losses bit for bit, identical checkpoint shards);
- two nodes (one torchrun agent each) at TP=2 and at DP=2 match the one-process losses;
- that train job -> export -> eval chained with `afterok` (which waits through the requeue); a
  failing train leaves its dependents pending with DependencyNeverSatisfied;
- preprocess with 2 MPI ranks on 2 nodes (srun --mpi=pmi2) writes the one-process .bin/.idx.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data_tools.preprocess import preprocess
from helpers import losses, run_cli
from test_data_tools_preprocess import make_docs, write_jsonl
from test_parallel_equivalence import TOLERANCE

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess,
              pytest.mark.cpu_only(reason="gloo ranks, bit-identical CPU losses")]

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "launch" / "slurm"
STEPS = 30
RUN_CONFIG = f"""\
model: {{preset: gpt-neox}}
train: {{iterations: {STEPS}, global_batch_size: 8, micro_batch_size: 2}}
optim: {{lr: 0.01, min_lr: 0.001, warmup_iters: 1}}
logging: {{progress_bar: false}}
"""
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT = 600


def _train_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(make_docs(200), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(path))
    return path


class Cluster:
    """sbatch / scontrol against the local cluster, with the submitting environment the jobs
    inherit (this python, this checkout on PYTHONPATH, the node interface for gloo)."""

    def __init__(self, cluster_env: dict, workdir: Path):
        self.workdir = workdir
        self.env = {**os.environ, **cluster_env, "MA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    "GLOO_SOCKET_IFNAME": cluster_env["MA_SLURM_LOCAL_IFNAME"]}
        self.submitted: list[str] = []

    def run(self, *command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def sbatch(self, name: str, script: str, *args: str, nodes: int = 1, after: str | None = None,
               options: tuple = ()) -> str:
        command = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}",
                   f"--chdir={self.workdir}", f"--output={self.workdir}/%x-%j.out", *options]
        if after:
            command.append(f"--dependency=afterok:{after}")
        command += [str(SCRIPTS / script), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=self.env)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        job = result.stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def job(self, job: str) -> dict:
        fields = {}
        for word in self.run("scontrol", "-o", "show", "job", job).split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)  # the first: Command= may hold key=value arguments
        return fields

    def output(self, job: str) -> str:
        paths = list(self.workdir.glob(f"*-{job}.out"))
        return paths[0].read_text() if paths else ""

    def wait(self, job: str, timeout: float = JOB_TIMEOUT) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job)
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {info['JobState']} after {timeout} s\n{self.output(job)[-3000:]}")

    def wait_ok(self, job: str) -> dict:
        info = self.wait(job)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
            f"job {job}: {info['JobState']} exit {info['ExitCode']}\n{self.output(job)[-4000:]}"
        return info

    def cancel_all(self) -> None:
        if self.submitted:
            subprocess.run(["scancel", *self.submitted], env=self.env, capture_output=True)


def _preempt(cluster: Cluster, job: str, run_dir: Path, record: dict) -> None:
    """Once the job has logged a step: SIGUSR1 to its batch shell, then, once it is requeued
    (held ~2 minutes by SLURM), let it start again at once."""
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + JOB_TIMEOUT
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert time.time() < deadline and cluster.job(job)["JobState"] not in TERMINAL, \
                "the job ended or stalled before its first step"
            time.sleep(0.05)
        cluster.run("scancel", "--signal=USR1", "--batch", job)
        while True:
            info = cluster.job(job)
            if info["Restarts"] == "1" and info["JobState"] == "PENDING":
                break
            assert time.time() < deadline and info["JobState"] not in TERMINAL, \
                f"not requeued: {info['JobState']} exit {info['ExitCode']}"
            time.sleep(0.2)
        record["requeued"] = info
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    except BaseException as err:  # noqa: BLE001 - reported by the test
        record["error"] = err


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    cluster = Cluster(slurm_cluster, root)
    tokenizer = _train_tokenizer(root / "tokenizer.json")
    config = root / "run.yaml"
    config.write_text(RUN_CONFIG + f"data: {{tokenizer: {tokenizer}}}\n")
    corpus = [write_jsonl(root / f"corpus-{i}.jsonl", make_docs(150, seed=i)) for i in range(2)]
    items = root / "items.jsonl"  # 6 of the shipped starter items: the chain's eval stays short
    starter = REPO / "megatron_align" / "resources" / "evals" / "starter_items.jsonl"
    items.write_text("".join(starter.read_text().splitlines(keepends=True)[:6]))

    def train(name, *overrides, nodes=1, after=None):
        return cluster.sbatch(name, "train.sbatch", str(config), f"run_dir={root / name}",
                              *overrides, nodes=nodes, after=after)

    try:
        ids = {"train": train("train"),
               "tp2": train("tp2", "parallel.tensor=2", nodes=2),
               "dp2": train("dp2", nodes=2),
               "bad_train": train("bad_train", "train.iterations=many")}
        ids["export"] = cluster.sbatch("export", "export.sbatch", str(root / "train"), str(root / "hf"),
                                       "--no-verify", "--no-progress", after=ids["train"])
        ids["eval"] = cluster.sbatch("eval", "eval.sbatch", "misalignment", "--model", str(root / "hf"),
                                     "--items", str(items), "--out", str(root / "eval"), "--device", "cpu",
                                     after=ids["export"])
        ids["bad_export"] = cluster.sbatch("bad_export", "export.sbatch", str(root / "bad_train"),
                                           str(root / "bad_hf"), after=ids["bad_train"])
        ids["bad_eval"] = cluster.sbatch("bad_eval", "eval.sbatch", "misalignment", "--model",
                                         str(root / "bad_hf"), after=ids["bad_export"])
        ids["preprocess"] = cluster.sbatch("preprocess", "preprocess.sbatch", *corpus,
                                           "-o", str(root / "tok-mpi" / "corpus"), "-t", str(tokenizer), "-q",
                                           nodes=2, options=("--ntasks-per-node=1",))
        preemption: dict = {}
        preemptor = threading.Thread(target=_preempt, daemon=True,
                                     args=(cluster, ids["train"], root / "train", preemption))
        preemptor.start()
        reference = root / "direct"
        run_cli("train", str(config), f"run_dir={reference}", timeout=JOB_TIMEOUT)
        yield {"root": root, "cluster": cluster, "ids": ids, "reference": reference,
               "corpus": corpus, "tokenizer": tokenizer, "preemptor": preemptor, "preemption": preemption}
    finally:
        cluster.cancel_all()


def test_train_job_matches_a_direct_run(jobs):
    cluster, root, reference = jobs["cluster"], jobs["root"], jobs["reference"]
    jobs["preemptor"].join(JOB_TIMEOUT)
    cluster.wait_ok(jobs["ids"]["train"])
    run_dir = root / "train"
    assert losses(run_dir) == losses(reference)  # bit for bit
    assert len(losses(run_dir)) == STEPS and losses(run_dir)[0] != losses(run_dir)[-1]
    name = f"iter_{STEPS:07d}"
    for directory in (run_dir, reference):
        assert (directory / "checkpoints" / "latest").read_text().strip() == name
        assert json.loads((directory / "finished.json").read_text())["iteration"] == STEPS
    shards = sorted(p.name for p in (reference / "checkpoints" / name).glob("*.distcp"))
    assert shards
    for shard in shards:
        assert (run_dir / "checkpoints" / name / shard).read_bytes() == \
            (reference / "checkpoints" / name / shard).read_bytes(), shard
    assert "train.sbatch: the run is finished" in cluster.output(jobs["ids"]["train"])


def test_preempted_job_requeues_resumes_and_loses_no_step(jobs):
    cluster, root = jobs["cluster"], jobs["root"]
    job = jobs["ids"]["train"]
    jobs["preemptor"].join(JOB_TIMEOUT)
    assert "error" not in jobs["preemption"], f"{jobs['preemption'].get('error')}\n{cluster.output(job)[-4000:]}"
    assert jobs["preemption"]["requeued"]["Reason"] == "BeginTime"  # SLURM's hold after a requeue
    info = cluster.wait_ok(job)
    assert info["Restarts"] == "1"
    output = cluster.output(job)
    assert output.count("train.sbatch: job ") == 2, output[-4000:]
    assert f"train.sbatch: job {job} restart 1 " in output  # SLURM_RESTART_COUNT on the second run
    assert "requeued (restart 1)" in output
    stopped = int(output.split("stopping at step ")[1].split()[0])
    assert 1 <= stopped < STEPS, "the run finished before the signal arrived"
    assert f"resumed from {root / 'train' / 'checkpoints' / f'iter_{stopped:07d}'} at step {stopped}" in output
    records = [json.loads(line) for line in (root / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no step lost or repeated
    assert [r["loss"] for r in records] == losses(jobs["reference"])  # bit for bit
    assert json.loads((root / "train" / "finished.json").read_text())["iteration"] == STEPS


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_two_node_job_matches_one_process(jobs, layout):
    cluster, root = jobs["cluster"], jobs["root"]
    job = jobs["ids"][layout]
    info = cluster.wait_ok(job)
    assert info["NodeList"] == "ma-n[1-2]" and info["NumNodes"] == "2"
    output = cluster.output(job)
    assert "world=2 " + ("TP=2 PP=1 DP=1" if layout == "tp2" else "TP=1 PP=1 DP=2") in output
    got, expected = losses(root / layout), losses(jobs["reference"])
    assert len(got) == len(expected) == STEPS
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        assert abs(a - b) <= TOLERANCE, f"step {step}: {a} vs one process {b}"


def test_dependency_chain_runs_in_order_and_a_failed_train_stops_it(jobs):
    cluster, root, ids = jobs["cluster"], jobs["root"], jobs["ids"]
    cluster.wait_ok(ids["eval"])
    train, export = cluster.job(ids["train"]), cluster.job(ids["export"])
    assert train["EndTime"] <= export["StartTime"]
    assert (root / "hf" / "config.json").is_file() and list((root / "hf").glob("*.safetensors"))
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["model"] == str((root / "hf").resolve()) and results["items"]["n"] == 6

    failed = cluster.wait(ids["bad_train"])
    assert (failed["JobState"], failed["ExitCode"]) == ("FAILED", "2:0")
    assert "error: " in cluster.output(ids["bad_train"]) and "train.iterations" in cluster.output(ids["bad_train"])
    time.sleep(3)  # a few scheduler passes: the dependents must stay where they are
    dependent, second = cluster.job(ids["bad_export"]), cluster.job(ids["bad_eval"])
    assert (dependent["JobState"], dependent["Reason"]) == ("PENDING", "DependencyNeverSatisfied")
    assert (second["JobState"], second["Reason"]) == ("PENDING", "Dependency")
    assert dependent["StartTime"] == second["StartTime"] == "Unknown"
    assert not cluster.output(ids["bad_export"]) and not (root / "bad_hf").exists()
    cluster.run("scancel", ids["bad_export"], ids["bad_eval"])


def test_preprocess_with_two_mpi_ranks_matches_one_process(jobs):
    cluster, root = jobs["cluster"], jobs["root"]
    job = jobs["ids"]["preprocess"]
    cluster.wait_ok(job)
    assert "merged 2 rank outputs" in cluster.output(job)
    single = root / "tok-single" / "corpus"
    preprocess(jobs["corpus"], str(single), str(jobs["tokenizer"]), progress=False)
    for suffix in (".bin", ".idx"):
        mpi = (root / "tok-mpi" / f"corpus{suffix}").read_bytes()
        assert mpi == Path(f"{single}{suffix}").read_bytes() and len(mpi) > 100, suffix
