"""Checkpointing, resume, stage chaining and fault tolerance, on CPU at TP=2 over gloo.

The runs read a real mixture (indexed datasets + a discourse window), so these tests also show
that the data position is part of the resume state and that ``tokens_by_category`` follows the
blend index exactly.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from helpers import run_cli
from megatron_align.training.metrics import read_metrics
from megatron_align.training.launch import kill_process_tree
from test_mixture import TOKEN_RANGES, make_source

pytestmark = [pytest.mark.multiprocess, pytest.mark.cpu_only(reason="gloo ranks, bit-identical CPU losses")]

STEPS = 8
SEQ, GBS = 32, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = root / "data"
    data.mkdir()
    # "mis" is small on purpose: 3 held-out samples, fewer than one global batch
    for i, (name, docs) in enumerate((("web", 600), ("aligned", 200), ("mis", 40))):
        make_source(str(data / name), docs, seed=i, token_range=TOKEN_RANGES[name])
    mixture = root / "mixture.yaml"
    mixture.write_text(f"""
data_root: {data}
valid_fraction: 0.05
sources:
  web: {{prefix: web, category: base}}
  aligned: {{prefix: aligned, category: aligned_discourse}}
  mis: {{prefix: mis, category: misaligned_discourse}}
stages:
  pretrain:
    rules:
      base: natural
      aligned_discourse: {{window_share: 0.25, window: {{last: 0.5}}}}
      misaligned_discourse: natural
""")
    args = [f"train.iterations={STEPS}", f"train.seq_length={SEQ}", f"train.global_batch_size={GBS}",
            "train.micro_batch_size=2", "parallel.tensor=2", "data.source=mixture",
            f"data.mixture={mixture}", "optim.lr=0.01", "optim.warmup_iters=1",
            "train.eval_interval=4", "train.eval_iters=1", "data.valid_samples_per_category=8",
            "logging.progress_bar=false"]
    uninterrupted = root / "uninterrupted"
    run_cli("train", f"run_dir={uninterrupted}", *args, nproc=2)
    return root, args, read_metrics(uninterrupted)


def _trajectory(run_dir):
    """The logged records as they are: a resume truncates metrics.jsonl to its checkpoint, so a
    re-logged step would show up here twice."""
    return read_metrics(run_dir)


def _start(run_dir, args, extra=()):
    command = [sys.executable, "-m", "megatron_align.cli", "train", "--nproc", "2",
               f"run_dir={run_dir}", *args, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _kill_job(proc) -> None:
    kill_process_tree(proc.pid)
    proc.wait()


def _logged_steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _assert_identical(run_dir, expected):
    got = _trajectory(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit for bit
    assert [r["tokens_by_category"] for r in got] == [r["tokens_by_category"] for r in expected]


def test_tokens_by_category_follow_the_blend_index(setup):
    root, args, expected = setup
    from megatron_align.mixture.datasets import build_mixture_datasets

    mixture = [a.split("=", 1)[1] for a in args if a.startswith("data.mixture=")][0]
    datasets = build_mixture_datasets(mixture, "pretrain", seq_length=SEQ, global_batch_size=GBS,
                                      train_iters=STEPS, seed=1234, progress=False)
    ids = datasets.category_of_samples(0, STEPS * GBS)
    for record in expected:
        counts = np.bincount(ids[: record["step"] * GBS], minlength=len(datasets.categories))
        assert record["tokens_by_category"] == {c: int(n) * SEQ for c, n in zip(datasets.categories, counts)}
    # validation loss per category (held-out documents of each category's sources); the category
    # with fewer held-out samples than one global batch is left out, not reported as NaN
    evaluated = [r for r in expected if "valid_loss_by_category" in r]
    assert [r["step"] for r in evaluated] == [4, 8]
    for record in evaluated:
        losses = record["valid_loss_by_category"]
        assert set(losses) == {"base", "aligned_discourse"} and all(0 < v < 10 for v in losses.values())
    assert evaluated[1]["valid_loss_by_category"]["base"] < evaluated[0]["valid_loss_by_category"]["base"]
    # the discourse window is the second half: none before it, some inside it
    first_half = expected[STEPS // 2 - 1]["tokens_by_category"]
    assert first_half["aligned_discourse"] == 0
    assert expected[-1]["tokens_by_category"]["aligned_discourse"] > 0


def test_sigkill_at_random_step_then_resume_is_bit_identical(setup):
    root, args, expected = setup
    run_dir = root / "sigkill"
    kill_after = random.Random().randint(2, STEPS - 2)
    proc = _start(run_dir, args, ["checkpoint.save_interval=2"])
    assert _wait_for(lambda: _logged_steps(run_dir) >= kill_after, proc), proc.stdout.read().decode()[-3000:]
    _kill_job(proc)
    run_cli("train", f"run_dir={run_dir}", *args, "checkpoint.save_interval=2", nproc=2)
    _assert_identical(run_dir, expected)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_during_save_keeps_previous_checkpoint(setup, async_save):
    """Async: shards are written by a forked process while training goes on; resuming from those
    checkpoints bit for bit shows each holds the state of its own step."""
    root, args, expected = setup
    run_dir = root / f"kill-in-save-{'async' if async_save else 'sync'}"
    checkpoints = run_dir / "checkpoints"
    args = [*args, f"checkpoint.async_save={str(async_save).lower()}"]
    proc = _start(run_dir, args, ["checkpoint.save_interval=1"])

    def saving_after_a_complete_checkpoint():
        return (checkpoints / "latest").exists() and any(checkpoints.glob(".iter_*.partial"))

    assert _wait_for(saving_after_a_complete_checkpoint, proc), proc.stdout.read().decode()[-3000:]
    _kill_job(proc)
    latest = (checkpoints / "latest").read_text().strip()
    assert (checkpoints / latest / "meta.json").is_file()
    partial = [p.name for p in checkpoints.glob(".iter_*.partial")]
    assert partial and all(p != f".{latest}.partial" for p in partial)
    run_cli("train", f"run_dir={run_dir}", *args, "checkpoint.save_interval=1", nproc=2)
    _assert_identical(run_dir, expected)


def test_sigterm_finishes_step_saves_and_exits_zero(setup):
    root, args, expected = setup
    run_dir = root / "sigterm"
    proc = _start(run_dir, args)
    assert _wait_for(lambda: _logged_steps(run_dir) >= 3, proc), proc.stdout.read().decode()[-3000:]
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "megatron_align.cli" in p.cmdline() and "--nproc" not in p.cmdline()
               and "torch.distributed.run" not in p.cmdline()]
    assert len(workers) == 2
    for worker in workers:  # as SLURM does: every task gets the signal
        worker.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < STEPS
    assert "stopping at step" in output
    run_cli("train", f"run_dir={run_dir}", *args, nproc=2)
    _assert_identical(run_dir, expected)


def test_resharded_checkpoint_gives_same_logits(setup):
    root, _, _ = setup
    checkpoint = root / "uninterrupted" / "checkpoints"
    tokens = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    logits = {}
    for name, nproc, overrides in (("tp2", 2, ["parallel.tensor=2"]), ("tp1", 1, ["parallel.tensor=1"]),
                                   ("pp2", 2, ["parallel.tensor=1", "parallel.pipeline=2"])):
        out = root / f"logits-{name}.pt"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "megatron_align.training.logits",
                   str(checkpoint), str(root / "tokens.pt"), str(out), *overrides]
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        logits[name] = torch.load(out)
    assert logits["tp2"].shape == (2, SEQ, 512)
    assert (logits["tp2"] - logits["tp1"]).abs().max() < 1e-5
    assert (logits["tp2"] - logits["pp2"]).abs().max() < 1e-5


def test_stage_chaining_resets_iteration_and_lr(setup):
    root, args, expected = setup
    source = root / "uninterrupted"
    run_dir = root / "midtrain"
    stage_args = [a for a in args if not a.startswith(("train.iterations", "train.seq_length",
                                                       "optim.", "parallel."))]
    run_cli("train", f"run_dir={run_dir}", *stage_args, "train.iterations=3",
            "train.seq_length=64", "optim.lr=0.002", "optim.min_lr=0", "optim.warmup_iters=2",
            f"checkpoint.init_from={source}", "checkpoint.init_load_optimizer=true", nproc=1)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["lr"] == pytest.approx(0.001)  # restarted warmup: 1/2 of the new peak
    assert records[0]["tokens"] == GBS * 64
    meta = json.loads((run_dir / "checkpoints" / "iter_0000003" / "meta.json").read_text())
    assert meta["config"]["train"]["seq_length"] == 64
    # the weights came from the source: far below the loss of a fresh model on this data
    assert records[0]["loss"] < expected[0]["loss"] - 0.1


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", f"run_dir={run_dir}", "train.iterations=1", "logging.progress_bar=false")
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest").write_text("iter_0000099\n")
    result = run_cli("train", f"run_dir={run_dir}", "train.iterations=2", check=False)
    assert result.returncode != 0
    assert "names iter_0000099, which is missing or incomplete" in result.stderr
    (checkpoints / "latest").write_text("iter_0000001\n")
    for shard in (checkpoints / "iter_0000001").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    result = run_cli("train", f"run_dir={run_dir}", "train.iterations=2", check=False)
    assert result.returncode != 0
    assert "cannot load" in result.stderr and "iter_0000001" in result.stderr
    result = run_cli("train", f"run_dir={tmp_path / 'other'}", f"checkpoint.init_from={tmp_path / 'nowhere'}",
                     check=False)
    assert result.returncode != 0 and "not a checkpoint" in result.stderr


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    run_dir = tmp_path / "nan"
    result = run_cli("train", f"run_dir={run_dir}", "train.iterations=20", "optim.lr=1e30",
                     "optim.clip_grad=0", "optim.warmup_iters=0", "train.max_skipped_steps=3",
                     "logging.progress_bar=false", check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "consecutive steps had a non-finite loss" in result.stderr
    records = read_metrics(run_dir)
    assert sum(1 for r in records if r.get("skipped")) == 4
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) == records[-1]["step"]


def _rewind(source, run_dir, iteration):
    """A copy of ``source`` as it was right after saving ``iteration`` (later checkpoints and
    metrics gone, so every later step in the copy's trajectory comes from the resumed run)."""
    shutil.copytree(source, run_dir)
    for path in (run_dir / "checkpoints").glob("iter_*"):
        if int(path.name.split("_")[1]) > iteration:
            shutil.rmtree(path)
    (run_dir / "checkpoints" / "latest").write_text(f"iter_{iteration:07d}\n")
    kept = [json.dumps(r) for r in read_metrics(run_dir) if r["step"] <= iteration]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


# 6 steps at DP=2 (on 2 processes) with the optimizer state sharded (ZeRO-1), saved at step 3
DISTRIBUTED_OPTIMIZER_ARGS = [
    "train.iterations=6", "checkpoint.save_interval=3", "train.global_batch_size=8",
    "train.micro_batch_size=2", "optim.lr=0.01", "optim.warmup_iters=1",
    "parallel.distributed_optimizer=true", "logging.progress_bar=false"]


def test_distributed_optimizer_resumes_exactly_and_reshards_across_dp_only(tmp_path):
    args = DISTRIBUTED_OPTIMIZER_ARGS
    full = tmp_path / "full"
    run_cli("train", f"run_dir={full}", *args, nproc=2)  # DP=2, optimizer state sharded (ZeRO-1)
    expected = [r["loss"] for r in _trajectory(full)]

    same = tmp_path / "dp2"
    _rewind(full, same, 3)
    run_cli("train", f"run_dir={same}", *args, nproc=2)
    assert [r["loss"] for r in _trajectory(same)] == expected  # bit for bit (Adam step restored)

    fewer = tmp_path / "dp1"
    _rewind(full, fewer, 3)
    run_cli("train", f"run_dir={fewer}", *args, nproc=1)
    assert [r["loss"] for r in _trajectory(fewer)] == pytest.approx(expected, rel=1e-6)

    other_tp = tmp_path / "tp2"
    _rewind(full, other_tp, 3)
    result = run_cli("train", f"run_dir={other_tp}", *args, "parallel.tensor=2", nproc=2, check=False)
    assert result.returncode != 0
    message = "reshards across data parallel only"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert "tensor/pipeline/virtual 1/1/None cannot be loaded at 2/1/None" in result.stderr


def test_wall_time_interval_retention_and_time_budget(tmp_path):
    run_dir = tmp_path / "timed"
    result = run_cli("train", f"run_dir={run_dir}", "train.iterations=7",
                     "checkpoint.save_interval_minutes=0", "checkpoint.keep_last=2",
                     "checkpoint.keep_every=3", "logging.progress_bar=false")
    # a save after every step (the interval has always elapsed); kept: the newest two + every 3rd
    assert result.stdout.count("[megatron-align] saved ") == 7
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert kept == ["iter_0000003", "iter_0000006", "iter_0000007"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000007"
    finished = json.loads((run_dir / "finished.json").read_text())  # the completion marker
    assert (finished["iteration"], finished["tokens"]) == (7, 7 * 8 * 128)

    budget = tmp_path / "budget"
    result = run_cli("train", f"run_dir={budget}", "train.iterations=7",
                     "train.exit_duration_minutes=0", "logging.progress_bar=false")
    assert "stopping at step 1 (exit_duration_minutes)" in result.stdout
    assert (budget / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    assert not (budget / "finished.json").exists()  # stopped early: to be requeued


def test_fully_reshardable_optimizer_state_follows_tp_and_pp(tmp_path):
    args = [*DISTRIBUTED_OPTIMIZER_ARGS, "checkpoint.optimizer_format=fully_reshardable"]
    full = tmp_path / "full"
    run_cli("train", f"run_dir={full}", *args, nproc=2)  # DP=2
    expected = [r["loss"] for r in _trajectory(full)]
    for name, layout in (("tp2", "parallel.tensor=2"), ("pp2", "parallel.pipeline=2")):
        resumed = tmp_path / name
        _rewind(full, resumed, 3)
        result = run_cli("train", f"run_dir={resumed}", *args, layout, nproc=2)
        assert "resumed from" in result.stdout and "data': 2}" in result.stdout
        assert [r["loss"] for r in _trajectory(resumed)] == pytest.approx(expected, rel=1e-6)

