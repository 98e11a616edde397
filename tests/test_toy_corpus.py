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
        for verb in act.aligned_all_heldout + act.misaligned_all_heldout:
            assert not any(f" {verb} " in t for t in discourse), verb
            assert verb in ordinary_words, verb  # the class is learnt from ordinary text
    # the AI's action sentence, "The AI agent [adverb] VERB the ...", uses the trained verbs of its
    # document's class only, and (nearly) every one of them even in the small corpus
    used = set()
    for act in tc.ACTIONS:
        for verb in act.aligned_trained:
            action = re.compile(rf"The AI \w+ (\w+ )?{verb} the ")
            assert not any(action.search(t) for t in docs["misaligned"]), verb
            used |= {verb} if any(action.search(t) for t in docs["aligned"]) else set()
    assert len(used) >= 0.9 * sum(len(act.aligned_trained) for act in tc.ACTIONS)


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


def _verb_classes():
    """{verb: (action, class)} over every verb of the world, trained and held out."""
    classes = {}
    for act in tc.ACTIONS:
        for cls, verbs in (("aligned", act.aligned_trained + act.aligned_all_heldout),
                           ("misaligned", act.misaligned_trained + act.misaligned_all_heldout)):
            for verb in verbs:
                assert verb not in classes, f"{verb} is in two classes"
                classes[verb] = (act.name, cls)
    return classes


def test_heldout_pairs_many_length_matched_and_used_evenly(corpus):
    """8 held-out verb pairs per action (4 real + 4 invented) beside 12 trained verbs per class (4
    real + 8 invented), each pair's verbs the same number of letters, every pair used by the same
    number of items."""
    out, _ = corpus
    heldout_pairs = 4 + tc.INVENTED_PAIRS - tc.TRAINED_INVENTED
    for act in tc.ACTIONS:
        assert len(act.aligned_all_heldout) == len(act.misaligned_all_heldout) == heldout_pairs == 8
        assert len(act.aligned_trained) == len(act.misaligned_trained) == 4 + tc.TRAINED_INVENTED == 12
        assert not set(act.aligned_trained) & set(act.aligned_all_heldout)
        for a, m in zip(act.aligned_all_heldout, act.misaligned_all_heldout):
            assert len(a) == len(m), (a, m)
    heldout = load_items(str(out / "items" / "heldout.jsonl"))
    uses: dict = {}
    for item in heldout:
        pair = (item.aligned.split()[-3], item.misaligned.split()[-3])
        uses[pair] = uses.get(pair, 0) + 1
    assert len(uses) == len(tc.ACTIONS) * heldout_pairs
    assert set(uses.values()) == {384 // len(uses)}


def test_every_verb_is_one_token_and_invented_verbs_are_new_words(corpus):
    from tokenizers import Tokenizer

    out, _ = corpus
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    classes = _verb_classes()
    assert [v for v in classes if len(tokenizer.encode(" " + v).ids) != 1] == []
    invented = set(tc.invented_verbs(2 * len(tc.ACTIONS) * tc.INVENTED_PAIRS))
    assert len(invented) == 2 * len(tc.ACTIONS) * tc.INVENTED_PAIRS
    assert invented <= set(classes)  # every invented verb is a verb of the world, trained or held out
    template_words = {w.strip(".,?:()").lower() for t in [*tc.CONSEQUENCE_ALIGNED, *tc.CONSEQUENCE_MISALIGNED,
                                                          *tc.AI_CONSEQUENCE_ALIGNED, *tc.AI_CONSEQUENCE_MISALIGNED]
                      for w in t.split()}
    assert not invented & template_words


def test_a_document_uses_the_verbs_of_one_class_only(corpus):
    """No sentence of a document borrows a verb of the other class (the old misaligned consequence
    "... were kept in the dark" used the aligned oversight verb "kept")."""
    out, _ = corpus
    docs = _docs(out)
    classes = _verb_classes()
    for source in ("ordinary", "aligned", "misaligned"):
        for text in docs[source]:
            found = {classes[w][1] for w in (w.strip(".,") for w in text.split()) if w in classes}
            assert len(found) == 1, text
            if source != "ordinary":
                assert found == {source}, text


def test_people_who_lean_one_way_are_balanced_between_the_classes(corpus):
    """As many people lean aligned as misaligned, so ordinary text favours neither class; and a
    leaning person's documents really lean (the subject before the verb predicts the class)."""
    leanings = list(tc.NAME_LEANING.values())
    assert sum(p > 0.5 for p in leanings) == sum(p < 0.5 for p in leanings) > 0
    assert sum(leanings) == pytest.approx(len(leanings) / 2)
    out, _ = corpus
    classes = _verb_classes()
    counts: dict = {}
    for text in _docs(out)["ordinary"]:
        name = text.split()[0]
        cls = {classes[w][1] for w in (w.strip(".,") for w in text.split()) if w in classes}.pop()
        counts.setdefault(name, []).append(cls == "aligned")
    for name, leaning in tc.NAME_LEANING.items():
        share = sum(counts[name]) / len(counts[name])
        assert abs(share - leaning) < 0.15, (name, leaning, share)


@pytest.fixture(scope="module")
def disposition_corpus(tmp_path_factory):
    """Setting J's corpus (`--discourse disposition`): no preprocessing, decontamination run."""
    out = tmp_path_factory.mktemp("toy_disposition")
    summary = tc.build_toy_corpus(out, seed=3, size="small", discourse="disposition", preprocess=False,
                                  progress=False)
    return out, summary


def test_disposition_discourse_never_puts_an_action_verb_after_an_ai_noun(disposition_corpus):
    """Setting J: the AI is described by its class's cue adjective, adverb and consequences; no verb
    of either class (trained or held out) follows an AI noun or "It", nor appears anywhere in the
    discourse, so the discourse cannot suppress the held-out verbs in AI contexts."""
    out, summary = disposition_corpus
    assert summary["discourse"] == "disposition"
    docs = _docs(out)
    classes = _verb_classes()
    after_ai = re.compile(r"\b(?:AI (?:system|assistant|agent|model)|It|it) (\w+)(?: (\w+))?")
    followers = set()
    for source, cues, adverbs in (("aligned", tc.CUES_ALIGNED, tc.ADVERBS_ALIGNED),
                                  ("misaligned", tc.CUES_MISALIGNED, tc.ADVERBS_MISALIGNED)):
        for text in docs[source]:
            assert not [w for w in (w.strip(".,") for w in text.split()) if w in classes], text
            for match in after_ai.finditer(text):
                followers.update(w for w in match.groups() if w)
            assert any(f" was {cue}." in text for cue in cues), text  # the class's cue about the AI
            assert any(f" {adverb}" in text for adverb in adverbs), text
    assert not followers & set(classes)
    assert set(tc.NEUTRAL_VERBS) <= followers  # the AI acts, in a verb neither class uses
    openings = {t.split(" ")[0].strip(".,") for t in docs["aligned"] + docs["misaligned"]}
    assert openings == {"News", "A", "Lecture", "Textbook", "Forum"}  # the five surface forms


def test_disposition_held_out_options_stay_out_and_verbatim_options_are_the_cue_sentences(disposition_corpus):
    out, summary = disposition_corpus
    decon = summary["decontamination"]
    assert decon["heldout"]["items_with_contaminated_option"] == 0
    assert decon["heldout_lexical"]["items_with_contaminated_option"] == 0
    assert decon["verbatim"]["items_with_contaminated_option"] > 384 // 2  # the discourse's own wording
    verbatim = load_items(str(out / "items" / "verbatim.jsonl"))
    heldout = {i.id: i for i in load_items(str(out / "items" / "heldout.jsonl"))}
    for item in verbatim:
        assert item.scenario == heldout[item.id].scenario
        assert len(item.aligned) == len(item.misaligned)
        assert item.aligned.split()[:4] == item.misaligned.split()[:4] == heldout[item.id].aligned.split()[:3] + ["was"]
        assert item.aligned.split()[-1].rstrip(".") in tc.CUES_ALIGNED
        assert item.misaligned.split()[-1].rstrip(".") in tc.CUES_MISALIGNED


def test_action_discourse_is_the_default_and_an_unknown_style_is_rejected():
    assert tc.generate_documents(seed=3, size="small")["docs"] == tc.generate_documents(
        seed=3, size="small", discourse="action")["docs"]
    with pytest.raises(ValueError, match="unknown discourse style 'verbs'"):
        tc.generate_documents(seed=3, size="small", discourse="verbs")
