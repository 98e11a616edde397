"""data_tools preprocess / inspect / stats: round trips, input formats, MPI, bad input."""
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from data_tools import cli
from data_tools.errors import DataToolsError
from data_tools.indexed_writer import optimal_token_dtype
from data_tools.preprocess import megatron_indexed, preprocess
from megatron_align.io import SidecarError, read_stats
from data_tools.tokenizers import TokenizerError, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the a robot machine learns to help people with data and code while thinking about safety in "
    "every new world of systems river music garden bread quickly slowly because although"
).split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
        doc = " ".join(words).capitalize() + "."
        if i % 7 == 0:
            doc += "\nA second paragraph, with  two spaces, a tab\tand ünïcödé ✓ 日本語."
        docs.append(doc)
    return docs


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": len(d)}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus():
    return make_docs(240)


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory, corpus):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text("\n".join(corpus), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2,
    )
    return str(d / "sp.model")


def read_docs(prefix):
    ds = megatron_indexed().IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == len(ds)
    return [ds[i].tolist() for i in range(len(ds))]


def files_in(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_round_trip_text_to_bin_idx_and_back(kind, tmp_path, corpus, hf_tokenizer, sp_tokenizer):
    tok_path = hf_tokenizer if kind == "hf" else sp_tokenizer
    src = write_jsonl(tmp_path / "docs.jsonl", corpus)
    prefix = str(tmp_path / "out" / "docs")
    stats = preprocess([src], prefix, tok_path, progress=False)
    tok = load_tokenizer(tok_path)
    assert tok.kind == kind

    docs = read_docs(prefix)
    assert len(docs) == len(corpus)
    for ids, text in zip(docs, corpus):
        assert ids[-1] == tok.eod_id
        assert tok.eod_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text
    assert stats == read_stats(prefix)
    assert stats["documents"] == len(corpus)
    assert stats["tokens"] == sum(len(d) for d in docs)
    assert stats["dtype"] == "uint16"
    assert np.dtype(megatron_indexed().IndexedDataset(prefix).index.dtype) == np.uint16
    assert stats["tokenizer"]["kind"] == kind
    assert stats["tokenizer"]["sha256"] == hashlib.sha256(open(tok_path, "rb").read()).hexdigest()
    assert stats["tokenizer"]["eod_id"] == tok.eod_id
    assert stats["inputs"] == [{"path": src, "lines": len(corpus), "documents": len(corpus), "skipped": 0}]
    assert sum(stats["skipped"].values()) == 0
    assert files_in(tmp_path / "out") == ["docs.bin", "docs.idx", "docs.stats.json"]


def test_hf_eod_is_endoftext_and_override(tmp_path, hf_tokenizer):
    tok = load_tokenizer(hf_tokenizer)
    assert tok.eod_id == tok._tok.token_to_id("<|endoftext|>")
    with pytest.raises(TokenizerError, match="--eod-token"):
        load_tokenizer(hf_tokenizer, eod_token="<|not-there|>")
    # a tokenizer without <|endoftext|> and without any eos needs an explicit --eod-token
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.train_from_iterator(["abc def"] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<sep>"], show_progress=False))
    path = str(tmp_path / "bare.json")
    bare.save(path)
    with pytest.raises(TokenizerError, match=r"bare\.json.*--eod-token"):
        load_tokenizer(path)
    assert load_tokenizer(path, eod_token="<sep>").eod_id == bare.token_to_id("<sep>")


def test_sentencepiece_without_eos_needs_override(tmp_path, corpus):
    import sentencepiece as spm

    (tmp_path / "t.txt").write_text("\n".join(corpus[:50]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "noeos"), vocab_size=400,
        eos_id=-1, byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    with pytest.raises(TokenizerError, match="eos_id = -1"):
        load_tokenizer(str(tmp_path / "noeos.model"))
    assert load_tokenizer(str(tmp_path / "noeos.model"), eod_token="<s>").eod_id == 1
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(str(tmp_path / "noeos.model"), eod_token="<|nope|>")


def test_a_fork_of_a_process_that_tokenised_on_threads_finishes(tmp_path, hf_tokenizer):
    """The first run starts the tokenizer's Rust thread pool in this process; a forked child
    inherits that pool without its threads and must not wait on it forever."""
    import multiprocessing

    src = write_jsonl(tmp_path / "d.jsonl", make_docs(3000, seed=5))
    preprocess([src], str(tmp_path / "parent"), hf_tokenizer, workers=2, progress=False)
    child = multiprocessing.get_context("fork").Process(
        target=preprocess, args=([src], str(tmp_path / "child"), hf_tokenizer),
        kwargs={"workers": 2, "progress": False})
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert (tmp_path / "child.bin").read_bytes() == (tmp_path / "parent.bin").read_bytes()


def test_token_dtype_rule():
    assert optimal_token_dtype(50304) == np.uint16
    assert optimal_token_dtype(65499) == np.uint16
    assert optimal_token_dtype(65500) == np.int32
    assert optimal_token_dtype(128256) == np.int32
    for vocab in (100, 50304, 65499, 65500, 128256):  # the same rule as megatron-core's
        assert optimal_token_dtype(vocab) == megatron_indexed().DType.optimal_dtype(vocab)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_batch_writer_bytes_equal_megatron_core_builder(tmp_path, dtype):
    from data_tools.indexed_writer import IndexedWriter

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n).astype(dtype) for n in (1, 7, 300, 2, 4096, 1, 55)]
    ref = megatron_indexed().IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for doc in docs:
        ref.add_document(doc, [doc.size])
    ref.finalize(str(tmp_path / "ref.idx"))
    ours = IndexedWriter(str(tmp_path / "ours.bin"), dtype)
    for batch in (docs[:3], docs[3:4], [], docs[4:]):  # batches of several sizes, one empty
        flat = np.concatenate(batch) if batch else np.zeros(0, dtype=dtype)
        ours.add_documents(flat, np.array([d.size for d in batch], dtype=np.int64))
    ours.finalize(str(tmp_path / "ours.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    assert [d.tolist() for d in docs] == read_docs(str(tmp_path / "ours"))


def test_empty_dataset_index_equals_megatron_core_builder(tmp_path):
    from data_tools.indexed_writer import IndexedWriter

    ref = megatron_indexed().IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ref.finalize(str(tmp_path / "ref.idx"))
    ours = IndexedWriter(str(tmp_path / "ours.bin"), np.uint16)
    ours.finalize(str(tmp_path / "ours.idx"))
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_gz_zst_parquet_dirs_and_globs_match_plain_jsonl(tmp_path, corpus, hf_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    plain = write_jsonl(tmp_path / "all.jsonl", corpus)
    preprocess([plain], str(tmp_path / "plain"), hf_tokenizer, progress=False)

    parts = tmp_path / "parts"
    parts.mkdir()
    a, b, c = corpus[:80], corpus[80:160], corpus[160:]
    with gzip.open(parts / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in a)
    payload = "".join(json.dumps({"text": d}) + "\n" for d in b).encode()
    (parts / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    pq.write_table(pa.table({"text": c, "n": list(range(len(c)))}), parts / "c.parquet", row_group_size=30)
    (parts / "notes.txt").write_text("ignored: not a supported suffix")

    for spec in ([str(parts)], [str(parts / "*.jsonl.*"), str(parts / "c.parquet")]):
        prefix = str(tmp_path / "mixed")
        stats = preprocess(spec, prefix, hf_tokenizer, progress=False)
        assert [os.path.basename(i["path"]) for i in stats["inputs"]] == ["a.jsonl.gz", "b.jsonl.zst", "c.parquet"]
        assert [i["documents"] for i in stats["inputs"]] == [80, 80, len(c)]
        for suffix in (".bin", ".idx"):
            assert open(prefix + suffix, "rb").read() == open(str(tmp_path / "plain") + suffix, "rb").read()


def test_workers_output_identical_to_single_process(tmp_path, corpus, hf_tokenizer, monkeypatch):
    import data_tools.preprocess as pp

    monkeypatch.setattr(pp, "BATCH_DOCS", 16)  # many batches, so ordering across workers matters
    src = write_jsonl(tmp_path / "d.jsonl", corpus)
    preprocess([src], str(tmp_path / "one"), hf_tokenizer, workers=1, progress=False)
    preprocess([src], str(tmp_path / "two"), hf_tokenizer, workers=2, progress=False)
    for suffix in (".bin", ".idx"):
        assert open(str(tmp_path / "one") + suffix, "rb").read() == open(str(tmp_path / "two") + suffix, "rb").read()


def _run_cli(args, env_extra=None, mpi_ranks=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "data_tools", *args]
    if mpi_ranks:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec, "-n", str(mpi_ranks), *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.multiprocess
def test_mpi_two_ranks_byte_identical_to_single_process(tmp_path, corpus, hf_tokenizer):
    # three inputs of uneven size: the rank boundary (record 120 of 240) falls inside b.jsonl
    inputs = [
        write_jsonl(tmp_path / "a.jsonl", corpus[:50]),
        write_jsonl(tmp_path / "b.jsonl", corpus[50:200]),
        write_jsonl(tmp_path / "c.jsonl", corpus[200:]),
    ]
    single = str(tmp_path / "single")
    preprocess(inputs, single, hf_tokenizer, progress=False)

    merged = str(tmp_path / "out" / "merged")
    proc = _run_cli(["preprocess", *inputs, "-o", merged, "-t", hf_tokenizer, "--mpi", "-q"], mpi_ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 rank outputs" in proc.stderr
    for suffix in (".bin", ".idx"):
        assert open(merged + suffix, "rb").read() == open(single + suffix, "rb").read()
    stats, ref = read_stats(merged), read_stats(single)
    for key in ("documents", "tokens", "dtype", "inputs", "skipped", "tokenizer"):
        assert stats[key] == ref[key], key
    assert files_in(tmp_path / "out") == ["merged.bin", "merged.idx", "merged.stats.json"]

    listed = str(tmp_path / "list" / "ds")
    proc = _run_cli(["preprocess", *inputs, "-o", listed, "-t", hf_tokenizer, "--mpi", "--mpi-output", "list", "-q"], mpi_ranks=2)
    assert proc.returncode == 0, proc.stderr
    listing = json.load(open(listed + ".prefixes.json"))
    prefixes = [p["prefix"] for p in listing["prefixes"]]
    assert prefixes == [listed + "-00000-of-00002", listed + "-00001-of-00002"]
    assert [p["documents"] for p in listing["prefixes"]] == [120, 120]
    assert read_docs(prefixes[0]) + read_docs(prefixes[1]) == read_docs(single)


@pytest.mark.multiprocess
def test_mpi_bad_record_is_one_error_and_no_output(tmp_path, corpus, hf_tokenizer):
    good = write_jsonl(tmp_path / "a.jsonl", corpus[:40])
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(open(write_jsonl(tmp_path / "b0.jsonl", corpus[40:80]), "rb").read()
                    + b'{"text": "broken\n')  # line 41 of b.jsonl: in rank 1's shard
    out = tmp_path / "out"
    proc = _run_cli(["preprocess", good, str(bad), "-o", str(out / "ds"), "-t", hf_tokenizer, "--mpi", "-q"],
                    mpi_ranks=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{bad}:41:" in errors[0], proc.stderr
    assert not out.exists() or files_in(out) == []


BAD_LINES = {
    "invalid_json": b'{"text": "broken',
    "missing_field": b'{"body": "no text key here"}',
    "empty": b'{"text": "   "}',
    "invalid_utf8": b'{"text": "bad \xff\xfe bytes"}',
}


def write_bad_file(path, bad_kinds):
    lines = [b'{"text": "first good document"}']
    lines += [BAD_LINES[k] for k in bad_kinds]
    lines.append(b'{"text": "last good document"}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_record_fails_with_file_and_line_and_leaves_nothing(kind, tmp_path, hf_tokenizer, capsys):
    src = write_bad_file(tmp_path / "in.jsonl", [kind])
    out = tmp_path / "out"
    rc = cli.main(["preprocess", src, "-o", str(out / "ds"), "-t", hf_tokenizer, "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err
    assert {"invalid_json": "invalid JSON", "missing_field": "'text'", "empty": "empty", "invalid_utf8": "UTF-8"}[kind] in err
    assert files_in(out) == []


def test_bad_record_fails_in_worker_and_mpi_free_paths_too(tmp_path, hf_tokenizer):
    src = write_bad_file(tmp_path / "in.jsonl", ["invalid_json"])
    with pytest.raises(DataToolsError, match=r"in\.jsonl:2:"):
        preprocess([src], str(tmp_path / "ds"), hf_tokenizer, workers=2, progress=False)
    assert files_in(tmp_path) == ["in.jsonl"]


def test_skip_counts_bad_records_in_sidecar(tmp_path, hf_tokenizer, capsys):
    kinds = sorted(BAD_LINES)
    src = write_bad_file(tmp_path / "in.jsonl", kinds)
    prefix = str(tmp_path / "ds")
    rc = cli.main(["preprocess", src, "-o", prefix, "-t", hf_tokenizer, "--on-error", "skip", "-q"])
    assert rc == 0
    err = capsys.readouterr().err
    for line_no in range(2, 2 + len(kinds)):
        assert f"{src}:{line_no}:" in err
    stats = read_stats(prefix)
    assert stats["skipped"] == {k: 1 for k in kinds}
    assert stats["documents"] == 2
    assert stats["inputs"][0]["documents"] == 2 and stats["inputs"][0]["skipped"] == 4
    tok = load_tokenizer(hf_tokenizer)
    assert [tok.decode(d[:-1]) for d in read_docs(prefix)] == ["first good document", "last good document"]


def test_missing_parquet_column_and_missing_input_named(tmp_path, hf_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataToolsError, match=r"p\.parquet: no column 'text'"):
        preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "ds"), hf_tokenizer, progress=False)
    with pytest.raises(DataToolsError, match="nothere.jsonl: no such file"):
        preprocess([str(tmp_path / "nothere.jsonl")], str(tmp_path / "ds"), hf_tokenizer, progress=False)
    assert not os.path.exists(tmp_path / "ds.bin")


def test_read_stats_errors_name_the_file(tmp_path):
    with pytest.raises(SidecarError, match=r"nope\.stats\.json: stats sidecar not found"):
        read_stats(str(tmp_path / "nope"))
    (tmp_path / "bad.stats.json").write_text("{not json")
    with pytest.raises(SidecarError, match=r"bad\.stats\.json: not valid JSON"):
        read_stats(str(tmp_path / "bad"))
    (tmp_path / "old.stats.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(SidecarError, match=r"old\.stats\.json: missing key"):
        read_stats(str(tmp_path / "old"))


def test_inspect_reports_counts_histogram_and_samples(tmp_path, corpus, hf_tokenizer, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", corpus)
    prefix = str(tmp_path / "ds")
    stats = preprocess([src], prefix, hf_tokenizer, progress=False)
    png = str(tmp_path / "hist.png")
    assert cli.main(["inspect", prefix, "--samples", "2", "--plot", png]) == 0
    out = capsys.readouterr().out
    assert f"documents   {len(corpus):,}   tokens {stats['tokens']:,}" in out
    assert "<|endoftext|>" in out  # detokenised samples end with the EOD token
    assert sum(int(line.split()[-1].replace(",", "")) for line in out.splitlines() if line.strip()[:1].isdigit() and "-" in line.split()[0]) == len(corpus)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_orjson_fast_path_gives_the_same_text_and_errors_as_json(monkeypatch):
    import data_tools.readers as readers

    pytest.importorskip("orjson")  # an optional dependency: without it json is the only path
    lines = [
        b'{"text": "plain", "id": 1}', '{"text": "\u00fcn\u00efc\u00f6d\u00e9 \u2713"}'.encode(),
        b'{"text": "a", "text": "last key wins"}', b'{"text": "x", "n": NaN}', b'{"text": "y", "big": 123456789012345678901234567890}',
        b'{"text": "lone \\ud800 surrogate"}', b'["not", "an", "object"]', b'{"text": 5}', b'{"other": "field"}',
        b'{"text": "   "}', b'{"text": "cut', b'{"text": "bad \xff utf8"}', b'{"text": null}',
    ]
    fast = [readers.parse_record(line, "text", fast_json=True) for line in lines]
    slow = [readers.parse_record(line, "text") for line in lines]
    monkeypatch.setattr(readers, "orjson", None)
    assert [readers.parse_record(line, "text", fast_json=True) for line in lines] == slow
    verdict = [r if isinstance(r, readers.BadRecord) else r[1] for r in fast]  # what preprocess uses
    assert verdict == [r if isinstance(r, readers.BadRecord) else r[1] for r in slow]
    assert [isinstance(r, readers.BadRecord) for r in fast].count(True) == 7
