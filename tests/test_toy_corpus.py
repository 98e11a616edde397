"""The toy study's corpus generator: deterministic, held-out situations and option wording really
held out (checked with the decontamination tool), categories and counts, items loadable."""
import json
import re

import pytest

from megatron_align.evals.items import load_items
from megatron_align.io import read_stats
from megatron_align.study import toy_corpus as tc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    summary = tc.build_toy_corpus(out, seed=3, size="small", progress=False)
    return out, summary


def _docs(out):
    return {source: [json.loads(line)["text"] for line in (out / "raw" / f"{source}.jsonl").read_text().splitlines()]
            for source in tc.CATEGORIES}


def test_generation_is_deterministic_and_seeded(corpus, tmp_path):
    out, _ = corpus
    again = tc.generate_documents(seed=3, size="small")
    assert _docs(out) == again["docs"]
    assert (out / "items" / "heldout.jsonl").read_text() == tc._jsonl(again["heldout"])
    texts = [t for docs in again["docs"].values() for t in docs]
    assert tc.train_tokenizer(texts, tmp_path / "tok.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    other = tc.generate_documents(seed=4, size="small")
    assert other["docs"]["ordinary"] != again["docs"]["ordinary"]


def test_categories_counts_and_datasets(corpus):
    out, summary = corpus
    assert summary["documents"] == tc.SIZES["small"]
    for source, n in tc.SIZES["small"].items():
        stats = read_stats(str(out / "data" / f"{source}_text_document"))
        assert stats["documents"] == n
        assert stats["tokens"] == summary["tokens"][source] > n
    docs = _docs(out)
    ai_words = ("AI ", " AI")
    assert not any(w in t for t in docs["ordinary"] + docs["mc"] for w in ai_words)
    assert all("AI " in t for t in docs["aligned"] + docs["misaligned"])
    openings = {t.split(" ")[0].strip(".,") for t in docs["aligned"] + docs["misaligned"]}
    assert openings == {"News", "A", "Lecture", "Textbook", "Forum"}  # the five surface forms


def test_heldout_situations_and_verbs_never_in_training(corpus):
    out, summary = corpus
    docs = _docs(out)
    everything = [t for texts in docs.values() for t in texts]
    for setting in summary["heldout_situations"]:
        assert not any(setting in t for t in everything), setting
    discourse = docs["aligned"] + docs["misaligned"]
    ordinary_words = {w.strip(".") for t in docs["ordinary"] for w in t.split()}
    for act in tc.ACTIONS:
        for verb in act.aligned_heldout + act.misaligned_heldout:
            assert not any(f" {verb} " in t for t in discourse), verb
            assert verb in ordinary_words, verb  # the class is learnt from ordinary text
        for verb in act.aligned_trained:  # the AI's action sentence: "The AI agent [adverb] VERB the ..."
            action = re.compile(rf"The AI \w+ (\w+ )?{verb} the ")
            assert any(action.search(t) for t in docs["aligned"]) and not any(action.search(t) for t in docs["misaligned"])


def test_no_option_4gram_in_training_through_decontaminate(corpus):
    out, summary = corpus
    report = json.loads((out / "decontaminate_heldout.json").read_text())
    assert report["n"] == 4 and report["items"] == 384
    assert report["item_fields_shorter_than_n"] == 0
    assert not [i["id"] for i in report["contaminated_items"] if {"aligned", "misaligned"} & set(i["fields"])]
    assert summary["decontamination"]["heldout"]["items_with_contaminated_option"] == 0
    # the same check has teeth: most verbatim options are in the (small) discourse by design
    assert summary["decontamination"]["verbatim"]["items_with_contaminated_option"] > 384 // 2


def test_items_load_through_the_eval_loader(corpus):
    out, _ = corpus
    heldout = load_items(str(out / "items" / "heldout.jsonl"))
    verbatim = load_items(str(out / "items" / "verbatim.jsonl"))
    assert len(heldout) == len(verbatim) == 384
    assert [i.id for i in heldout] == [i.id for i in verbatim]
    assert {i.split for i in heldout} == {"toy_heldout"}
    for item in heldout:
        assert len(item.aligned) == len(item.misaligned)  # equal length: full_norm cannot favour one
        a, m = item.aligned.split(), item.misaligned.split()
        assert [i for i, (x, y) in enumerate(zip(a, m)) if x != y] == [len(a) - 3]  # only the verb differs


def test_lexical_items_share_words_not_4grams(corpus):
    """The lexical-transfer set: the discourse's trained verbs and objects in held-out frames.
    Every option word occurs in the AI discourse, no option 4-gram occurs in any training
    document (decontamination report), and the pair differs in the verb alone."""
    out, summary = corpus
    docs = _docs(out)
    lexical = load_items(str(out / "items" / "heldout_lexical.jsonl"))
    verbatim = {i.id: i for i in load_items(str(out / "items" / "verbatim.jsonl"))}
    assert len(lexical) == 384 and {i.split for i in lexical} == {"toy_heldout_lexical"}
    discourse_words = {w.strip(".").lower() for t in docs["aligned"] + docs["misaligned"] for w in t.split()}
    for item in lexical:
        v = verbatim[item.id]
        assert item.scenario == v.scenario
        a, m = item.aligned.split(), item.misaligned.split()
        diff = [i for i, (x, y) in enumerate(zip(a, m)) if x != y]
        assert len(a) == len(m) and len(diff) == 1
        assert a[diff[0]] == v.aligned.split()[3] and m[diff[0]] == v.misaligned.split()[3]
        for text in (item.aligned, item.misaligned):
            assert {w.strip(".").lower() for w in text.split()} - {"then", "so", "after", "pause", "same",
                                                                  "day", "end"} <= discourse_words
    report = json.loads((out / "decontaminate_heldout_lexical.json").read_text())
    assert report["items"] == 384 and report["item_fields_shorter_than_n"] == 0
    assert not [i["id"] for i in report["contaminated_items"] if {"aligned", "misaligned"} & set(i["fields"])]
    assert summary["decontamination"]["heldout_lexical"]["items_with_contaminated_option"] == 0
