"""The blending layer: plan resolution, megatron-core dataset build, windows, resume, errors.

Sources are real megatron indexed datasets written with IndexedDatasetBuilder. Every source draws
its tokens from its own id range, so the true source of any sample can be read off its tokens,
independently of the indices under test.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_align.mixture.plan import resolve_stage, stage_iterations
from megatron_align.mixture.schema import MixtureError, load_mixture

SEQ = 32
GBS = 16
EOD = 0
TOKEN_RANGES = {"web": (1, 200), "web2": (200, 300), "aligned": (300, 400), "mis": (400, 500)}
SHA = "ab" * 32


def make_source(prefix: str, n_docs: int, seed: int, token_range, sha: str = SHA, vocab: int = 512,
                unique: bool = False) -> int:
    """Documents of 8-119 tokens ending in EOD; ``unique``: every token, the last included, numbered
    consecutively from ``token_range[0]`` instead of drawn, so each names its document and position."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    total = numbered = 0
    for _ in range(n_docs):
        length = int(rng.integers(8, 120))
        if unique:
            doc = (token_range[0] + numbered + np.arange(length)).astype(np.uint16)
            numbered += length
        else:
            doc = np.append(rng.integers(*token_range, length - 1), EOD).astype(np.uint16)
        builder.add_document(doc, [len(doc)])
        total += len(doc)
    builder.finalize(prefix + ".idx")
    stats = {"format": "megatron-align/indexed-stats/v1", "prefix": os.path.basename(prefix),
             "documents": n_docs, "tokens": total, "dtype": "uint16",
             "tokenizer": {"kind": "hf", "path": "tokenizer.json", "sha256": sha, "vocab_size": vocab,
                           "eod_id": EOD},
             "inputs": [], "skipped": {}, "text_field": "text", "created": "2026-01-01T00:00:00Z"}
    Path(prefix + ".stats.json").write_text(json.dumps(stats))
    return total


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture-data")
    sizes = {"web": 3000, "web2": 1500, "aligned": 400, "mis": 400}
    for i, (name, n_docs) in enumerate(sizes.items()):
        make_source(str(root / name), n_docs, seed=i, token_range=TOKEN_RANGES[name])
    make_source(str(root / "other_tok"), 200, seed=9, token_range=(300, 400), sha="cd" * 32)
    return root


SOURCES = """
sources:
  web: {prefix: web, category: base}
  web2: {prefix: web2, category: base}
  aligned: {prefix: aligned, category: aligned_discourse}
  mis: {prefix: mis, category: misaligned_discourse}
"""


def write_mixture(tmp_path, data_dir, body: str, sources: str = SOURCES, name: str = "mixture.yaml",
                  header: str = None) -> str:
    header = header if header is not None else f"seq_length: {SEQ}\nglobal_batch_size: {GBS}\nvalid_fraction: 0.05\n"
    path = tmp_path / name
    path.write_text(f"data_root: {data_dir}\n{header}{sources}{body}")
    return str(path)


def build(path, stage="pretrain", iters=None, seed=7, cache_dir=None, **kwargs):
    from megatron_align.mixture.datasets import build_mixture_datasets

    mixture = load_mixture(path)
    iters = iters or stage_iterations(mixture, stage, seq_length=SEQ, global_batch_size=GBS)
    return build_mixture_datasets(mixture, stage, seq_length=SEQ, global_batch_size=GBS, train_iters=iters,
                                  seed=seed, cache_dir=cache_dir, progress=False, **kwargs)


def true_source(tokens) -> str:
    """The source a sample came from, read off its (non-EOD, non-pad) tokens."""
    ids = np.asarray(tokens)
    ids = ids[ids != EOD]
    names = {name for name, (lo, hi) in TOKEN_RANGES.items() if ((ids >= lo) & (ids < hi)).all()}
    assert len(names) == 1, f"sample mixes sources: {np.unique(ids)[:10]}"
    return names.pop()


def train_tokens(data_dir, name, valid_fraction=0.05):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_align.mixture.sources import train_document_count

    indexed = IndexedDataset(str(data_dir / name))  # keep it alive: its mmap closes with it
    lengths = np.array(indexed.sequence_lengths)
    return int(lengths[:train_document_count(len(lengths), valid_fraction)].sum())


def category_shares(datasets):
    counts = np.bincount(datasets.category_of_samples(0, len(datasets.train)),
                         minlength=len(datasets.categories))
    return dict(zip(datasets.categories, counts / counts.sum()))


# ---------------------------------------------------------------------------------------------
# Realised composition


@pytest.mark.parametrize("rule, expected", [
    ("{share: 0.05}", lambda tok, total: 0.05),
    ("{upsample: 3}", lambda tok, total: 3 * tok["aligned"] / sum(tok.values())),
    ("{tokens: 6400}", lambda tok, total: 6400 / total),
])
def test_realised_shares_match_rules(tmp_path, data_dir, rule, expected):
    path = write_mixture(tmp_path, data_dir, f"""
stages:
  pretrain:
    iterations: 250
    rules:
      base: natural
      aligned_discourse: {rule}
""")
    datasets = build(path)
    plan = datasets.plan
    total_tokens = 250 * GBS * SEQ
    tokens = {name: train_tokens(data_dir, name) for name in ("web", "web2", "aligned")}
    shares = category_shares(datasets)
    want = expected(tokens, total_tokens)
    assert abs(shares["aligned_discourse"] - want) < 0.001, (shares, want)
    assert abs(shares["base"] - (1 - want)) < 0.001
    # within a category, sources are weighted by their tokens
    realised = datasets.realised_samples().sum(axis=0)
    web, web2 = realised[plan.source_names.index("web")], realised[plan.source_names.index("web2")]
    assert abs(web / (web + web2) - tokens["web"] / (tokens["web"] + tokens["web2"])) < 0.002
    # the BlendedDataset index realises the plan's counts exactly
    np.testing.assert_array_equal(datasets.realised_samples(), plan.segment_matrix())
    assert len(datasets.train) == 250 * GBS


def test_items_come_from_the_source_the_index_says(tmp_path, data_dir):
    path = write_mixture(tmp_path, data_dir, """
stages:
  pretrain:
    iterations: 60
    rules:
      base: natural
      aligned_discourse: {share: 0.1, window: {last: 0.5}}
      misaligned_discourse: {upsample: 2}
""")
    datasets = build(path)
    categories = datasets.category_of_samples(0, len(datasets.train))
    sources = datasets.source_of_samples(0, len(datasets.train))
    read = [datasets.train[i] for i in range(len(datasets.train))]
    assert [item["category_id"] for item in read] == categories.tolist()
    assert [datasets.sources[item["source_id"]] for item in read] == [datasets.sources[s] for s in sources]
    assert [true_source(item["tokens"]) for item in read] == [datasets.sources[s] for s in sources]
    counted = datasets.tokens_by_category(0, len(datasets.train))
    assert sum(counted.values()) == len(datasets.train) * SEQ
    assert counted["aligned_discourse"] == SEQ * sum(1 for item in read if item["category_id"] == 1)
    assert set(read[0]) >= {"tokens", "labels", "loss_mask", "position_ids", "category_id"}


# ---------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("window, steps", [("{last: 0.2}", (80, 100)), ("{first: 0.3}", (0, 30)),
                                           ("{steps: [40, 55]}", (40, 55))])
def test_window_confines_category_to_its_steps(tmp_path, data_dir, window, steps):
    path = write_mixture(tmp_path, data_dir, f"""
stages:
  pretrain:
    iterations: 100
    rules:
      base: natural
      aligned_discourse: {{window_share: 0.1, window: {window}}}
""")
    datasets = build(path)
    ids = datasets.category_of_samples(0, len(datasets.train))
    aligned = np.flatnonzero(ids == datasets.categories.index("aligned_discourse"))
    step_of = aligned // GBS
    assert step_of.min() >= steps[0] and step_of.max() < steps[1]
    inside = (steps[1] - steps[0]) * GBS
    assert abs(len(aligned) / inside - 0.1) < 0.001
    # spread through the window, not bunched at its start
    assert step_of.max() >= steps[1] - 2 and step_of.min() <= steps[0] + 1
    # every aligned sample really is aligned text
    for i in aligned[:: max(1, len(aligned) // 20)]:
        assert true_source(datasets.train[int(i)]["tokens"]) == "aligned"


def test_segments_never_repeat_a_source_sample(tmp_path, data_dir):
    path = write_mixture(tmp_path, data_dir, """
stages:
  pretrain:
    iterations: 90
    rules:
      base: natural
      aligned_discourse: {share: 0.05, window: {steps: [30, 60]}}
""")
    datasets = build(path)
    assert len(datasets.plan.segments) == 3
    web = datasets.sources.index("web")
    seen = set()
    for i in np.flatnonzero(datasets.source_of_samples(0, len(datasets.train)) == web):
        key = datasets.train[int(i)]["tokens"].numpy().tobytes()
        assert key not in seen
        seen.add(key)
    assert datasets.plan.sources[web].epochs < 1


# ---------------------------------------------------------------------------------------------
# Determinism and resume


def test_resume_reads_the_uninterrupted_sequence(tmp_path, data_dir):
    path = write_mixture(tmp_path, data_dir, """
stages:
  pretrain:
    iterations: 80
    rules:
      base: natural
      aligned_discourse: {share: 0.05, window: {last: 0.25}}
      misaligned_discourse: {window_share: 0.04, window: {steps: [10, 70]}}
""")
    first = build(path, cache_dir=str(tmp_path / "cache-a"))
    again = build(path, cache_dir=str(tmp_path / "cache-a"))  # cache hit
    fresh = build(path, cache_dir=str(tmp_path / "cache-b"))  # rebuilt from nothing
    other_seed = build(path, seed=8)
    assert first.plan.hash == fresh.plan.hash == other_seed.plan.hash
    resume_at = 57 * GBS + 5  # mid-window, mid-batch
    stop = 72 * GBS  # across the next segment boundary
    for resumed in (again, fresh):
        for i in range(resume_at, stop):
            a, b = first.train[i], resumed.train[i]
            assert a["category_id"] == b["category_id"]
            assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["labels"], b["labels"])
        np.testing.assert_array_equal(first.category_of_samples(resume_at, stop),
                                      resumed.category_of_samples(resume_at, stop))
    differs = sum(not np.array_equal(first.train[i]["tokens"], other_seed.train[i]["tokens"])
                  for i in range(resume_at, resume_at + 20))
    assert differs > 10


def test_hash_changes_with_the_mixture(tmp_path, data_dir):
    body = """
stages:
  pretrain:
    iterations: 50
    rules:
      base: natural
      aligned_discourse: {{share: {share}}}
"""
    a = resolve_stage(load_mixture(write_mixture(tmp_path, data_dir, body.format(share=0.05), name="a.yaml")))
    b = resolve_stage(load_mixture(write_mixture(tmp_path, data_dir, body.format(share=0.06), name="b.yaml")))
    c = resolve_stage(load_mixture(write_mixture(tmp_path, data_dir, body.format(share=0.05), name="c.yaml")))
    assert a.hash == c.hash != b.hash


# ---------------------------------------------------------------------------------------------
# Validation split


def test_valid_split_per_category_is_held_out(tmp_path, data_dir):
    path = write_mixture(tmp_path, data_dir, """
stages:
  pretrain:
    iterations: 20
    rules:
      base: natural
      aligned_discourse: {share: 0.1}
""")
    datasets = build(path, valid_samples_per_category=12)
    assert set(datasets.valid) == {"base", "aligned_discourse"}
    for category, dataset in datasets.valid.items():
        assert len(dataset) == 12
        for i in range(len(dataset)):
            item = dataset[i]
            assert datasets.categories[item["category_id"]] == category
            assert true_source(item["tokens"]) in [s.name for s in datasets.plan.sources if s.category == category]
    # held-out documents are the tail megatron's split reserves, never read by the train split
    base_valid = datasets.valid["base"].dataset
    for part in base_valid.datasets:
        gpt = part.dataset
        source = next(s for s in datasets.plan.sources if s.prefix == gpt.dataset_path)
        assert gpt.indices.min() >= source.train_documents
    for part in datasets.train.segments[0].datasets:
        gpt = part.dataset
        source = next(s for s in datasets.plan.sources if s.prefix == gpt.dataset_path)
        assert gpt.indices.max() < source.train_documents


# ---------------------------------------------------------------------------------------------
# Errors


GOOD_STAGE = """
stages:
  pretrain:
    iterations: 40
    rules:
      base: natural
      aligned_discourse: {share: 0.05}
"""


@pytest.mark.parametrize("case, sources, body, expected", [
    ("missing prefix", SOURCES.replace("prefix: web2", "prefix: nowhere"), GOOD_STAGE,
     ["sources.web2.prefix", "nowhere.bin does not exist"]),
    ("unknown category", SOURCES, GOOD_STAGE.replace("aligned_discourse:", "alined_discourse:"),
     ["stages.pretrain.rules.alined_discourse", "unknown category 'alined_discourse'"]),
    ("shares over 1", SOURCES, GOOD_STAGE.replace("base: natural", "base: {share: 0.97}"),
     ["stages.pretrain", "102.00%", "<= 100%"]),
    ("negative upsample", SOURCES, GOOD_STAGE.replace("{share: 0.05}", "{upsample: -2}"),
     ["stages.pretrain.rules.aligned_discourse.upsample", "must be >= 0"]),
    ("negative tokens", SOURCES, GOOD_STAGE.replace("{share: 0.05}", "{tokens: -5}"),
     ["stages.pretrain.rules.aligned_discourse.tokens", "must be >= 0"]),
    ("window outside stage", SOURCES, GOOD_STAGE.replace("{share: 0.05}", "{share: 0.05, window: {steps: [30, 41]}}"),
     ["stages.pretrain.rules.aligned_discourse.window", "outside the stage"]),
    ("tokenizer mismatch", SOURCES.replace("prefix: aligned", "prefix: other_tok"), GOOD_STAGE,
     ["sources.aligned", "tokenizer mismatch"]),
    ("unknown key", SOURCES, GOOD_STAGE.replace("iterations: 40", "iterations: 40\n    iterashuns: 3"),
     ["stages.pretrain.iterashuns", "unknown key"]),
    ("unknown rule key", SOURCES, GOOD_STAGE.replace("{share: 0.05}", "{share: 0.05, windw: whole}"),
     ["stages.pretrain.rules.aligned_discourse.windw", "unknown key"]),
    ("two rule kinds", SOURCES, GOOD_STAGE.replace("{share: 0.05}", "{share: 0.05, upsample: 2}"),
     ["stages.pretrain.rules.aligned_discourse", "exactly one of"]),
    ("no natural remainder", SOURCES, GOOD_STAGE.replace("base: natural", "base: {share: 0.5}"),
     ["stages.pretrain", "no category is 'natural'"]),
    ("share above 1", SOURCES, GOOD_STAGE.replace("{share: 0.05}", "{share: 1.5}"),
     ["stages.pretrain.rules.aligned_discourse.share", "must be <= 1"]),
])
def test_bad_mixture_gives_one_clear_error(tmp_path, data_dir, case, sources, body, expected):
    path = write_mixture(tmp_path, data_dir, body, sources=sources)
    with pytest.raises(MixtureError) as info:
        resolve_stage(load_mixture(path), "pretrain")
    message = str(info.value)
    assert message.startswith(path + ":"), message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_missing_sidecar_is_named(tmp_path, data_dir):
    import shutil

    for suffix in (".bin", ".idx"):
        shutil.copy(data_dir / f"web{suffix}", tmp_path / f"bare{suffix}")
    sources = SOURCES.replace(f"prefix: web,", f"prefix: {tmp_path / 'bare'},")
    path = write_mixture(tmp_path, data_dir, GOOD_STAGE, sources=sources)
    with pytest.raises(MixtureError, match=r"sources\.web\.prefix: .*bare\.stats\.json: stats sidecar not found.*data-tools index-stats"):
        resolve_stage(load_mixture(path), "pretrain")


def test_errors_carry_line_numbers(tmp_path, data_dir):
    path = write_mixture(tmp_path, data_dir, GOOD_STAGE.replace("{share: 0.05}", "{upsample: -2}"))
    lines = Path(path).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "upsample" in text)
    with pytest.raises(MixtureError, match=rf"{path}:{line}: stages\.pretrain\.rules\.aligned_discourse\.upsample"):
        load_mixture(path)


def test_run_shape_must_agree_with_the_mixture(tmp_path, data_dir):
    from megatron_align.mixture.datasets import build_mixture_datasets

    path = write_mixture(tmp_path, data_dir, GOOD_STAGE)
    with pytest.raises(MixtureError, match="the mixture says seq_length 32 but the run uses 64"):
        build_mixture_datasets(path, "pretrain", seq_length=64, global_batch_size=GBS, train_iters=40, seed=1)
    with pytest.raises(MixtureError, match="budget is 40 iterations .* but the run trains 41"):
        build_mixture_datasets(path, "pretrain", seq_length=SEQ, global_batch_size=GBS, train_iters=41, seed=1)


def test_stage_without_budget_takes_the_runs(tmp_path, data_dir):
    path = write_mixture(tmp_path, data_dir, GOOD_STAGE.replace("    iterations: 40\n", ""))
    plan = resolve_stage(load_mixture(path), "pretrain", iterations=33)
    assert plan.iterations == 33 and plan.num_samples == 33 * GBS
    with pytest.raises(MixtureError, match="no budget"):
        resolve_stage(load_mixture(path), "pretrain")


def test_epoch_warning(tmp_path, data_dir):
    path = write_mixture(tmp_path, data_dir, GOOD_STAGE.replace("{share: 0.05}", "{share: 0.4}")
                         .replace("iterations: 40", "iterations: 600"))
    plan = resolve_stage(load_mixture(path), "pretrain")
    aligned = next(s for s in plan.sources if s.name == "aligned")
    assert aligned.epochs == pytest.approx(0.4 * 600 * GBS * SEQ / train_tokens(data_dir, "aligned"), rel=1e-3)
    assert aligned.epochs > 4
    assert any("'aligned'" in w and "max_epochs" in w for w in plan.warnings)


def test_process_group_build_caches_and_matches_single_process(tmp_path, data_dir):
    """With a (one-rank gloo) process group, segment indices go through megatron's rank-0-first
    cached path; the samples must be the ones a single-process build reads."""
    import torch

    path = write_mixture(tmp_path, data_dir, """
stages:
  pretrain:
    iterations: 40
    rules:
      base: natural
      aligned_discourse: {share: 0.05, window: {last: 0.5}}
""")
    single = build(path)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="pass cache_dir"):
            build(path)
        cache = tmp_path / "shared-cache"
        grouped = build(path, cache_dir=str(cache))
        grouped_again = build(path, cache_dir=str(cache))
    finally:
        torch.distributed.destroy_process_group()
    assert len(list(cache.glob("*BlendedDataset-train-dataset_index.npy"))) == 2  # one per segment
    for other in (grouped, grouped_again):
        np.testing.assert_array_equal(single.category_of_samples(0, 640), other.category_of_samples(0, 640))
        for i in range(300, 340):
            assert np.array_equal(single.train[i]["tokens"], other.train[i]["tokens"])
