"""data_tools over existing .bin/.idx datasets: index-stats (foreign datasets), merge, and what an
interrupted preprocess leaves behind."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from data_tools import cli
from data_tools.indexed_writer import optimal_token_dtype
from data_tools.preprocess import megatron_indexed, preprocess, remove_stale_partials, temp_prefix
from data_tools.tokenizers import load_tokenizer
from megatron_align.io import read_stats
from megatron_align.mixture.schema import MixtureError, load_mixture
from test_data_tools_preprocess import (  # noqa: F401 - fixtures
    corpus, files_in, hf_tokenizer, make_docs, read_docs, sp_tokenizer, write_jsonl)

SAME_KEYS = ("documents", "tokens", "dtype", "tokenizer")


def write_foreign(prefix, docs, tokenizer_path, *, eod=True, dtype=None, shift=0):
    """What Megatron-LM's / GPT-NeoX's preprocess_data.py leaves: .bin/.idx, no sidecar."""
    tok = load_tokenizer(tokenizer_path)
    dtype = dtype or optimal_token_dtype(tok.vocab_size)
    builder = megatron_indexed().IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in tok.encode_batch(docs):
        ids = [i + shift for i in ids] + ([tok.eod_id] if eod else [])
        builder.add_document(np.array(ids, dtype=dtype), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def mixture_yaml(tmp_path, base_prefix, aligned_prefix):
    path = tmp_path / "mixture.yaml"
    path.write_text(f"""seq_length: 32
global_batch_size: 16
valid_fraction: 0.05
sources:
  web: {{prefix: {base_prefix}, category: base}}
  aligned: {{prefix: {aligned_prefix}, category: aligned_discourse}}
stages:
  pretrain:
    iterations: 10
    rules:
      base: natural
      aligned_discourse: {{share: 0.2}}
""")
    return str(path)


def test_index_stats_makes_a_foreign_dataset_a_mixture_source(tmp_path, corpus, hf_tokenizer, capsys):
    from megatron_align.mixture.plan import resolve_stage
    from megatron_align.mixture.sources import inspect_sources

    ours = str(tmp_path / "ours" / "docs")
    ref = preprocess([write_jsonl(tmp_path / "d.jsonl", corpus)], ours, hf_tokenizer, progress=False)
    os.makedirs(tmp_path / "foreign")
    foreign = write_foreign(str(tmp_path / "foreign" / "docs"), corpus, hf_tokenizer)
    mixture = mixture_yaml(tmp_path, foreign, ours)
    with pytest.raises(MixtureError, match="stats sidecar not found"):
        resolve_stage(load_mixture(mixture), "pretrain")

    assert cli.main(["index-stats", foreign, "-t", hf_tokenizer, "-q"]) == 0
    out = capsys.readouterr().out
    assert f"checked     {len(corpus)} sampled documents" in out and "warning" not in out, out
    stats = read_stats(foreign)
    for key in SAME_KEYS:
        assert stats[key] == ref[key], key
    assert stats["source"] == "index-stats" and ref["source"] == "preprocess"
    assert stats["inputs"] == [] and stats["text_field"] is None and stats["warnings"] == []
    assert stats["check"]["ending_with_eod"] == len(corpus)

    infos = inspect_sources(load_mixture(mixture), ["web", "aligned"])
    assert (infos["web"].documents, infos["web"].tokens) == (len(corpus), ref["tokens"])
    assert infos["web"].tokenizer == infos["aligned"].tokenizer
    resolve_stage(load_mixture(mixture), "pretrain")

    assert cli.main(["index-stats", foreign, "-t", hf_tokenizer, "-q"]) == 2
    assert "docs.stats.json: already exists (made by index-stats); pass --force" in capsys.readouterr().err
    assert cli.main(["index-stats", foreign, "-t", hf_tokenizer, "-q", "--force", "--samples", "5"]) == 0
    assert read_stats(foreign)["check"]["sampled_documents"] == 5


def test_index_stats_warns_on_missing_eod_and_refuses_wrong_vocab_or_truncation(tmp_path, corpus, hf_tokenizer, capsys):
    no_eod = write_foreign(str(tmp_path / "no_eod"), corpus, hf_tokenizer, eod=False)
    assert cli.main(["index-stats", no_eod, "-t", hf_tokenizer, "-q"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {len(corpus)} of {len(corpus)} sampled documents do not end with the EOD token" in out, out
    assert "do not end with the EOD token" in read_stats(no_eod)["warnings"][0]

    vocab = load_tokenizer(hf_tokenizer).vocab_size
    wrong = write_foreign(str(tmp_path / "wrong"), corpus, hf_tokenizer, shift=vocab // 2)  # ids up to ~1.5 vocab
    assert cli.main(["index-stats", wrong, "-t", hf_tokenizer, "-q"]) == 2
    err = capsys.readouterr().err
    assert "wrong.bin: " in err and f"outside [0, {vocab})" in err and "no sidecar written" in err, err
    assert not os.path.exists(wrong + ".stats.json")

    cut = write_foreign(str(tmp_path / "cut"), corpus, hf_tokenizer)
    os.truncate(cut + ".bin", os.path.getsize(cut + ".bin") - 10)
    assert cli.main(["index-stats", cut, "-t", hf_tokenizer, "-q"]) == 2
    assert "truncated copy?" in capsys.readouterr().err
    assert cli.main(["index-stats", str(tmp_path / "absent"), "-t", hf_tokenizer, "-q"]) == 2
    assert "absent.bin: not found" in capsys.readouterr().err
    assert not [f for f in files_in(tmp_path) if f.endswith(".stats.json") and not f.startswith("no_eod")]


def test_merge_is_the_concatenation_and_refuses_mismatched_shards(tmp_path, corpus, hf_tokenizer, sp_tokenizer,
                                                                  capsys, monkeypatch):
    whole = str(tmp_path / "whole")
    ref = preprocess([write_jsonl(tmp_path / "all.jsonl", corpus)], whole, hf_tokenizer, progress=False)
    shards = []
    for i, part in enumerate((corpus[:50], corpus[50:170], corpus[170:])):
        shards.append(str(tmp_path / f"shard{i}"))
        preprocess([write_jsonl(tmp_path / f"s{i}.jsonl", part)], shards[-1], hf_tokenizer, progress=False)

    out = str(tmp_path / "out" / "merged")
    assert cli.main(["merge", out, *shards, "-q"]) == 0
    assert "shards      3: shard0 (50 docs), shard1 (120 docs), shard2 (70 docs)" in capsys.readouterr().out
    for suffix in (".bin", ".idx"):
        assert open(out + suffix, "rb").read() == open(whole + suffix, "rb").read()
    stats = read_stats(out)
    for key in SAME_KEYS:
        assert stats[key] == ref[key], key
    assert stats["source"] == "merge"
    assert [(i["path"], i["documents"]) for i in stats["inputs"]] == [(s, n) for s, n in zip(shards, (50, 120, 70))]
    assert files_in(tmp_path / "out") == ["merged.bin", "merged.idx", "merged.stats.json"]
    assert cli.main(["merge", out, *shards, "-q"]) == 2
    assert "merged.bin: already exists; pass --force" in capsys.readouterr().err

    other_tok = str(tmp_path / "sp_shard")
    preprocess([str(tmp_path / "s0.jsonl")], other_tok, sp_tokenizer, progress=False)
    int32 = write_foreign(str(tmp_path / "int32_shard"), corpus[:10], hf_tokenizer, dtype=np.int32)
    assert cli.main(["index-stats", int32, "-t", hf_tokenizer, "-q"]) == 0
    for bad, what in ((other_tok, "tokenizer.sha256"), (int32, "dtype (int32 vs uint16)")):
        capsys.readouterr()
        assert cli.main(["merge", str(tmp_path / "bad"), shards[0], bad, "-q"]) == 2
        err = capsys.readouterr().err
        assert f"{bad}.stats.json and {shards[0]}.stats.json disagree on {what}" in err, err
    assert not [f for f in files_in(tmp_path) if f.startswith(("bad", ".bad"))]

    # a crash mid-merge leaves nothing that looks finished
    builder = megatron_indexed().IndexedDatasetBuilder
    real_add_index, calls = builder.add_index, []

    def failing_add_index(self, prefix):
        calls.append(prefix)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_add_index(self, prefix)

    monkeypatch.setattr(builder, "add_index", failing_add_index)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["merge", str(tmp_path / "crashed"), *shards, "-q"])
    assert not [f for f in files_in(tmp_path) if "crashed" in f]


def test_stale_partials_of_dead_processes_only_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    prefix = str(tmp_path / "ds")

    def partial(name, pid, host=here):
        path = tmp_path / f".{name}-{host}-{pid}.bin"
        path.write_bytes(b"x")
        return str(path)

    gone = [partial("ds.partial", dead.pid), partial("ds-00001-of-00002.partial", dead.pid),
            partial("ds.partial.merge", dead.pid)]
    kept = [partial("ds.partial", os.getpid()),            # a live run
            partial("ds.partial", dead.pid, "other-node"),  # a pid we cannot check here
            partial("ds2.partial", dead.pid)]               # another dataset's
    assert temp_prefix(prefix) == str(tmp_path / f".ds.partial-{here}-{os.getpid()}")
    assert sorted(remove_stale_partials(prefix)) == sorted(gone)
    assert sorted(str(tmp_path / f) for f in files_in(tmp_path)) == sorted(kept)


def _preprocess_with_stderr_to(log, argv):
    """Target of a forked child: `data-tools ARGV` with stdout/stderr (its workers' too) in `log`."""
    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    os.dup2(sys.stderr.fileno(), 1)
    os.dup2(sys.stderr.fileno(), 2)
    os._exit(cli.main(argv))


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("kind, expected_workers", [("sentencepiece", 2), ("hf", 0)])
def test_sigkilled_preprocess_workers_exit_quietly_and_a_rerun_cleans_up(tmp_path, hf_tokenizer, sp_tokenizer,
                                                                         monkeypatch, kind, expected_workers):
    """SIGKILL the parent mid-run: its workers (a pool of two for SentencePiece; none for an HF
    tokenizer, whose Rust threads live in the one process) must go without a traceback, the
    partial files it leaves must be removed by the next run for the prefix, and that run's
    output is right. The run is a fork of this process (megatron-core already imported)."""
    import multiprocessing

    import data_tools.preprocess as pp

    tokenizer = sp_tokenizer if kind == "sentencepiece" else hf_tokenizer

    megatron_indexed()  # imported once here, not in the child
    monkeypatch.setattr(pp, "BATCH_DOCS", 512)  # 6 batches: workers are busy when the first lands
    docs = make_docs(3000 if kind == "sentencepiece" else 12000, seed=3)  # the one-process run is fast
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    prefix, log = str(tmp_path / "out" / "ds"), str(tmp_path / "stderr.txt")
    proc = multiprocessing.get_context("fork").Process(
        target=_preprocess_with_stderr_to, args=(log, ["preprocess", src, "-o", prefix, "-t", tokenizer, "-j", "2", "-q"]))
    proc.start()
    partial = temp_prefix(prefix)[: -len(str(os.getpid()))] + str(proc.pid) + ".bin"
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(partial) and os.path.getsize(partial) > 0):  # first batch written
            assert proc.is_alive() and time.monotonic() < deadline, open(log).read()
            time.sleep(0.002)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(p) for p in f.read().split()]
        assert len(workers) == expected_workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for pid in [proc.pid, *workers]:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    err = open(log).read()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert files_in(tmp_path / "out") == [os.path.basename(partial)]  # what the killed run left

    stats = preprocess([src], prefix, tokenizer, progress=False)
    assert files_in(tmp_path / "out") == ["ds.bin", "ds.idx", "ds.stats.json"]
    tok = load_tokenizer(tokenizer)
    assert stats["documents"] == len(docs)
    assert [tok.decode(ids[:-1]) for ids in read_docs(prefix)] == docs
