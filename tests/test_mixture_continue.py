"""Stages that share a source continue its stream (`continues:`), and `mixture plan`'s count of
documents read for the first time, resumed and again.

Every token of the test sources is numbered (``make_source(unique=True)``), so the tokens a stage
reads name the documents and positions it read, independently of the indices under test. The
expected samples come from megatron-core GPTDatasets built here directly.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_align.mixture.plan import resolve_stage
from megatron_align.mixture.schema import MixtureError, load_mixture
from test_mixture import EOD, SHA, make_source

SEQ, GBS, SEED = 32, 8, 7
FIRST_TOKEN = {"web": 1, "aligned": 30000}
VOCAB = 32768


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue-data")
    make_source(str(root / "web"), 300, 0, (FIRST_TOKEN["web"], 0), vocab=VOCAB, unique=True)
    make_source(str(root / "aligned"), 100, 1, (FIRST_TOKEN["aligned"], 0), vocab=VOCAB, unique=True)
    return root


def write(tmp_path, data_dir, stages: str, name="m.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"""data_root: {data_dir}
seq_length: {SEQ}
global_batch_size: {GBS}
valid_fraction: 0.05
sources:
  web: {{prefix: web, category: base}}
  aligned: {{prefix: aligned, category: aligned_discourse}}
stages:
{stages}""")
    return str(path)


def stage(name, iterations, continues=None, aligned="{share: 0.1}", base="natural", extra=""):
    lines = [f"  {name}:", f"    iterations: {iterations}"]
    if continues:
        lines.append(f"    continues: {continues}")
    lines += [line for line in extra.splitlines() if line]
    lines.append("    rules:")
    if base:
        lines.append(f"      base: {base}")
    if aligned:
        lines.append(f"      aligned_discourse: {aligned}")
    return "\n".join(lines) + "\n"


def build(path, name):
    from megatron_align.mixture.datasets import build_mixture_datasets

    mixture = load_mixture(path)
    plan = resolve_stage(mixture, name)
    return build_mixture_datasets(mixture, name, seq_length=SEQ, global_batch_size=GBS,
                                  train_iters=plan.iterations, seed=SEED, progress=False)


def source_samples(datasets, source: str) -> list[np.ndarray]:
    """The input tokens of every sample the stage reads from ``source``, in training order."""
    wanted = datasets.sources.index(source)
    ids = datasets.source_of_samples(0, len(datasets.train))
    return [datasets.train[int(i)]["tokens"].numpy() for i in np.flatnonzero(ids == wanted)]


def megatron_samples(data_dir, source: str, stage_name: str, num_samples: int, first: int, end: int):
    """Samples ``[first, end)`` of the GPTDataset megatron-core builds for ``num_samples`` samples of
    ``source`` with ``stage_name``'s data seed (what that stage's stream pass is)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_align.mixture.datasets import DatasetTokenizer, stage_seed
    from megatron_align.mixture.sources import split_string

    config = GPTDatasetConfig(
        random_seed=stage_seed(SEED, stage_name), sequence_length=SEQ, blend=([str(data_dir / source)], None),
        split=split_string(0.05), path_to_cache=str(data_dir / "direct-cache"), mmap_bin_files=True,
        tokenizer=DatasetTokenizer(VOCAB, EOD, SHA), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return [train[i]["tokens"].numpy() for i in range(first, end)], len(train)


def document_of(data_dir, source: str):
    """token -> document id, from the numbering make_source(unique=True) wrote."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(str(data_dir / source))
    lengths = np.array(indexed.sequence_lengths)
    starts = FIRST_TOKEN[source] + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return lambda tokens: np.searchsorted(starts, tokens, side="right") - 1


def tokens_read(samples) -> np.ndarray:
    """Every input token of ``samples`` (0 only pads: the sources number their tokens from 1)."""
    tokens = np.concatenate(samples) if samples else np.zeros(0, dtype=np.int64)
    return tokens[tokens != 0]


def test_continued_stage_reads_the_samples_after_the_earlier_ones(tmp_path, data_dir):
    from megatron_align.mixture.commands import main
    from megatron_align.mixture.reads import count_document_reads

    path = write(tmp_path, data_dir, stage("pretrain", 30) + stage("cpt", 15, continues="pretrain"))
    pretrain, cpt = build(path, "pretrain"), build(path, "cpt")
    for source in ("web", "aligned"):
        planned = {s.name: s for s in pretrain.plan.sources}[source].samples
        following = {s.name: s for s in cpt.plan.sources}[source].samples
        assert {s.name: s for s in cpt.plan.sources}[source].stream_start == planned
        expected, _ = megatron_samples(data_dir, source, "pretrain", planned, 0, planned + following)
        before, after = source_samples(pretrain, source), source_samples(cpt, source)
        # exactly pretrain's GPTDataset, in its shuffle order, from where pretrain stopped
        assert len(before) == planned and len(after) == following > 0
        assert all(np.array_equal(a, b) for a, b in zip(before, expected[:planned]))
        assert all(np.array_equal(a, b) for a, b in zip(after, expected[planned:]))
        # no token is read twice; documents both stages read are cut at a sample boundary
        first, then = tokens_read(before), tokens_read(after)
        assert len(np.intersect1d(first, then)) == 0
        assert len(np.unique(then)) == len(then)

    # the plan's counts (mixture plan --out DIR writes them to plan.json), checked against the tokens
    assert main(["mixture", "plan", path, "--seed", str(SEED), "--out", str(tmp_path / "plan")]) == 0
    report = json.loads((tmp_path / "plan" / "plan.json").read_text())["stages"]
    for source in ("web", "aligned"):
        doc = document_of(data_dir, source)
        seen = set(doc(tokens_read(source_samples(pretrain, source))))
        reads = set(doc(tokens_read(source_samples(cpt, source))))
        assert report["pretrain"]["documents_read"][source] == {
            "documents": len(seen), "first_seen": len(seen), "resumed": 0, "repeats": 0, "occurrences": len(seen)}
        assert report["cpt"]["documents_read"][source] == {
            "documents": len(reads), "first_seen": len(reads - seen), "resumed": len(reads & seen),
            "repeats": 0, "occurrences": len(reads)}
        assert len(reads - seen) > 0
    assert report["cpt"]["sources"][0]["continues"] == "pretrain"

    # without the key the stage reshuffles: it reads tokens pretrain read, and the plan says so
    plain_path = write(tmp_path, data_dir, stage("pretrain", 30) + stage("cpt", 15), name="plain.yaml")
    plain_pretrain, plain = build(plain_path, "pretrain"), build(plain_path, "cpt")
    assert plain_pretrain.plan.hash == pretrain.plan.hash
    counted = count_document_reads([plain_pretrain, plain])["cpt"]["web"]
    doc = document_of(data_dir, "web")
    seen_tokens = tokens_read(source_samples(pretrain, "web"))
    tokens = tokens_read(source_samples(plain, "web"))
    reads, seen = set(doc(tokens)), set(doc(seen_tokens))
    assert (counted.first_seen, counted.resumed, counted.repeats) == (len(reads - seen), 0, len(reads & seen))
    assert np.isin(tokens, seen_tokens).mean() > 0.3


def test_the_next_epoch_follows_when_the_stream_runs_out(tmp_path, data_dir):
    import torch

    from megatron_align.mixture.datasets import build_mixture_datasets
    from megatron_align.mixture.reads import count_document_reads

    path = write(tmp_path, data_dir, stage("pretrain", 40, aligned=None) +
                 stage("cpt", 60, continues="pretrain", aligned=None))
    plan = resolve_stage(load_mixture(path), "cpt")
    web = plan.sources[0]
    planned = 40 * GBS
    _, length = megatron_samples(data_dir, "web", "pretrain", planned, 0, 0)
    overflow = planned + 60 * GBS - length
    assert overflow > 0
    assert [(p.stage, p.num_samples, p.length) for p in web.stream] == [
        ("pretrain", planned, length), ("cpt", overflow, length)]
    assert any("new epoch" in w for w in plan.warnings)

    pretrain = build_mixture_datasets(load_mixture(path), "pretrain", seq_length=SEQ, global_batch_size=GBS,
                                      train_iters=40, seed=SEED, progress=False, valid_samples_per_category=8)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:  # the process-group build goes through megatron's cached BlendedDataset path
        cpt = build_mixture_datasets(load_mixture(path), "cpt", seq_length=SEQ, global_batch_size=GBS,
                                     train_iters=60, seed=SEED, cache_dir=str(tmp_path / "cache"),
                                     progress=False, valid_samples_per_category=8)
    finally:
        torch.distributed.destroy_process_group()
    rest, _ = megatron_samples(data_dir, "web", "pretrain", planned, planned, length)
    new_epoch, _ = megatron_samples(data_dir, "web", "cpt", overflow, 0, overflow)
    after = source_samples(cpt, "web")
    assert len(after) == len(rest) + len(new_epoch)
    assert all(np.array_equal(a, b) for a, b in zip(after, rest + new_epoch))

    # pretrain and cpt's first part read every token of the epoch once (but megatron's dropped tail)
    once = tokens_read(source_samples(pretrain, "web") + after[:len(rest)])
    assert len(np.unique(once)) == len(once)
    train_documents = web.train_documents
    assert web.train_tokens - SEQ <= len(once) <= web.train_tokens

    counted = count_document_reads([pretrain, cpt])["cpt"]["web"]
    assert counted.repeats > 0 and counted.first_seen + counted.resumed + counted.repeats == counted.documents
    assert counted.occurrences > counted.documents  # read in two passes

    # the held-out documents stay out of every pass; the continued source validates on pretrain's
    for gpt in cpt.streams[0]:
        assert gpt.indices.max() < train_documents
    valid = cpt.valid["base"]
    assert len(valid) == 8
    pretrain_valid = pretrain.valid["base"]
    for i in range(8):
        assert np.array_equal(valid[i]["tokens"], pretrain_valid[i]["tokens"])
        assert document_of(data_dir, "web")(tokens_read([valid[i]["tokens"].numpy()])).min() >= train_documents


def test_rule_level_continuation_and_unchanged_plans(tmp_path, data_dir):
    path = write(tmp_path, data_dir, stage("pretrain", 30) +
                 stage("cpt", 15, base="{natural: true, continues: pretrain}"))
    plan = resolve_stage(load_mixture(path), "cpt")
    web, aligned = plan.sources
    assert web.continues == "pretrain" and web.stream_start == 30 * GBS * 9 // 10
    assert aligned.continues is None and aligned.stream_start == 0
    assert [p.stage for p in aligned.stream] == ["cpt"]
    assert "continues" not in json.dumps(plan.normalised()["sources"][1])
    # a later continuing stage changes neither the earlier stage's plan nor the plan of a mixture
    # without the key (its hash is what checkpoints store)
    alone = resolve_stage(load_mixture(write(tmp_path, data_dir, stage("pretrain", 30), name="a.yaml")),
                          "pretrain")
    assert resolve_stage(load_mixture(path), "pretrain").hash == alone.hash
    plain = resolve_stage(load_mixture(write(tmp_path, data_dir, stage("pretrain", 30) + stage("cpt", 15),
                                             name="p.yaml")), "cpt")
    assert plain.hash != plan.hash and plain.segments == plan.segments


@pytest.mark.parametrize("case, stages, key_stage, expected", [
    ("unknown stage", stage("pretrain", 30) + stage("cpt", 15, continues="pretrian"), "cpt",
     "stages.cpt.continues: no stage 'pretrian' (stages: pretrain, cpt)"),
    ("itself", stage("pretrain", 30) + stage("cpt", 15, continues="cpt"), "cpt",
     "stages.cpt.continues: a stage cannot continue itself"),
    ("later stage", stage("pretrain", 30, continues="cpt") + stage("cpt", 15), "pretrain",
     "stages.pretrain.continues: stage 'cpt' comes after 'pretrain' in the mixture"),
    ("cycle", stage("pretrain", 30, continues="cpt") + stage("cpt", 15, continues="pretrain"), "pretrain",
     "this is a cycle: pretrain -> cpt -> pretrain"),
    ("shares no source", stage("pretrain", 30, aligned=None) + stage("mid", 5, base=None, aligned="natural")
     + stage("cpt", 15, continues="mid", aligned=None), "cpt",
     "stages.cpt.continues: stage 'mid' reads none of the sources of stage 'cpt'"),
    ("rule names a stage without the category", stage("pretrain", 30, aligned=None)
     + stage("cpt", 15, aligned="{share: 0.1, continues: pretrain}"), "cpt",
     "stages.cpt.rules.aligned_discourse.continues: stage 'pretrain' reads no 'aligned_discourse' source"),
    ("not a name", stage("pretrain", 30) + stage("cpt", 15, continues="[pretrain]"), "cpt",
     "stages.cpt.continues: expected a non-empty string, got a list"),
    ("other seq_length", stage("pretrain", 30) + stage("cpt", 15, continues="pretrain", extra="    seq_length: 64"),
     "cpt", "stage 'pretrain' reads source 'web' in samples of 32 tokens and this stage in samples of 64"),
    ("earlier stage without budget", stage("pretrain", 30).replace("    iterations: 30\n", "")
     + stage("cpt", 15, continues="pretrain"), "cpt",
     "stages.cpt.continues: continuing stage 'pretrain' needs that stage's plan from the mixture alone"),
])
def test_bad_continuation_names_file_line_and_key(tmp_path, data_dir, case, stages, key_stage, expected):
    path = write(tmp_path, data_dir, stages)
    lines = Path(path).read_text().splitlines()
    start = lines.index(f"  {key_stage}:")
    line = next(i for i, text in enumerate(lines[start:], start + 1) if "continues" in text)
    with pytest.raises(MixtureError) as info:
        resolve_stage(load_mixture(path), "cpt")
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message, message


def test_mixture_plan_refuses_a_cycle_with_exit_2(tmp_path, data_dir, capsys):
    from megatron_align.mixture.commands import main

    path = write(tmp_path, data_dir, stage("pretrain", 30, continues="cpt") + stage("cpt", 15, continues="pretrain"))
    assert main(["mixture", "plan", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:") and "cycle" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "plan.json").exists()
