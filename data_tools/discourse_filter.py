"""The rule-based AI-discourse filter.

A document is flagged when, anywhere in its text (case-insensitive, whole words):
  - a term from an instant-flag category matches, or
  - an intelligent-entity term matches AND a term from any negative category matches.

Term lists are plain text files, one term per line, `#` comments, in a terms directory
(the package ships starter lists in data_tools/terms/). In a term, a space matches any run
of whitespace and `*` matches any word characters (`robot*` -> robots, robotic).
Each category compiles to ONE regular expression: a character trie of its terms, so the
regex engine never tries the same prefix twice.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

from data_tools.errors import DataToolsError

INSTANT_CATEGORIES = ("scifi_ai_agents", "ai_safety_orgs", "ai_labs", "general_ai_terms")
ENTITY_CATEGORY = "intelligent_entities"
NEGATIVE_CATEGORIES = ("negative_verbs", "negative_adjectives", "negative_nouns", "existential_risk")
ALL_CATEGORIES = INSTANT_CATEGORIES + (ENTITY_CATEGORY,) + NEGATIVE_CATEGORIES
DEFAULT_TERMS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "terms")


def read_term_file(path: str) -> List[str]:
    terms = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            term = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if not term:
                continue
            term = " ".join(term.lower().split())
            if not re.search(r"\w", term):
                raise DataToolsError(f"{path}:{line_no}: term {term!r} has no letters or digits")
            terms.append(term)
    if not terms:
        raise DataToolsError(f"{path}: no terms")
    return terms


def load_terms(terms_dir: Optional[str] = None) -> Dict[str, List[str]]:
    """Read every category file `<terms_dir>/<category>.txt`; all nine must exist."""
    terms_dir = terms_dir or DEFAULT_TERMS_DIR
    out = {}
    for category in ALL_CATEGORIES:
        path = os.path.join(terms_dir, category + ".txt")
        if not os.path.exists(path):
            raise DataToolsError(f"{path}: term list for category {category!r} not found")
        out[category] = read_term_file(path)
    return out


def _trie_regex(terms: Iterable[str]) -> str:
    trie: dict = {}
    for term in terms:
        node = trie
        for ch in term:
            node = node.setdefault(ch, {})
        node[""] = True  # end of a term

    def atom(ch: str) -> str:
        if ch == " ":
            return r"\s+"
        if ch == "*":
            return r"\w*"
        return re.escape(ch)

    def emit(node: dict) -> str:
        ends = "" in node
        branches = [atom(ch) + emit(child) for ch, child in sorted(node.items()) if ch != ""]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:
            body = "(?:" + body + ")?"
        return body

    return emit(trie)


def _left_boundary(terms: Iterable[str]) -> str:
    # `\b` lets the regex engine skip ahead fast; it equals "no word character before" only
    # when every term starts with a word character.
    return r"\b" if all(re.match(r"\w", t) for t in terms) else r"(?<!\w)"


def compile_category(terms: Iterable[str], ignore_case: bool = True) -> "re.Pattern[str]":
    """One alternation (a trie) with word boundaries that also work for terms that begin or
    end in punctuation (`a.i.`, `p(doom)`)."""
    terms = list(terms)
    flags = re.IGNORECASE if ignore_case else 0
    return re.compile(_left_boundary(terms) + "(?:" + _trie_regex(terms) + r")(?!\w)", flags)


@dataclass
class Verdict:
    flagged: bool
    rules: List[str] = field(default_factory=list)  # e.g. ["general_ai_terms", "intelligent_entities+negative_verbs"]
    terms: Dict[str, Dict[str, int]] = field(default_factory=dict)  # category -> matched term -> count
    examples: List[str] = field(default_factory=list)  # short context snippets

    def as_dict(self) -> dict:
        return {"rules": self.rules, "terms": self.terms}


class DiscourseFilter:
    """Matching runs on `text.lower()` with case-sensitive patterns (much faster than
    re.IGNORECASE). `is_flagged` scans once with the union of all terms and, at each hit,
    asks which categories match there; `explain` reports every match per category."""

    def __init__(self, terms: Optional[Dict[str, List[str]]] = None, terms_dir: Optional[str] = None):
        self.terms = terms if terms is not None else load_terms(terms_dir)
        missing = [c for c in ALL_CATEGORIES if c not in self.terms]
        if missing:
            raise DataToolsError(f"term lists: category {missing[0]!r} missing")
        self.patterns = {c: compile_category(self.terms[c], ignore_case=False) for c in ALL_CATEGORIES}
        self._union = compile_category({t for c in ALL_CATEGORIES for t in self.terms[c]}, ignore_case=False)

    def _hits(self, low: str):
        """Yield (category, match) for every category term matching at every start position.

        One scan with the union pattern finds each candidate start; a term of another
        category may start inside a match, so the scan resumes one character later."""
        pos = 0
        while True:
            m = self._union.search(low, pos)
            if m is None:
                return
            start = m.start()
            for category, pattern in self.patterns.items():
                hit = pattern.match(low, start)
                if hit is not None:
                    yield category, hit
            pos = start + 1

    def categories_present(self, text: str, stop_when_flagged: bool = False) -> set:
        found: set = set()
        for category, _ in self._hits(text.lower()):
            found.add(category)
            if stop_when_flagged and _fires(found):
                break
        return found

    def is_flagged(self, text: str) -> bool:
        return _fires(self.categories_present(text, stop_when_flagged=True))

    def explain(self, text: str, max_examples: int = 3, context: int = 40) -> Verdict:
        """Every rule that fires and every matched term (run on flagged documents only)."""
        low = text.lower()
        shown = text if len(low) == len(text) else low  # lower() can change lengths (rare)
        matched: Dict[str, Dict[str, int]] = {}
        examples: List[str] = []
        last_end = {c: -1 for c in self.patterns}  # count non-overlapping matches, like finditer
        for category, m in self._hits(low):
            if m.start() < last_end[category]:
                continue
            last_end[category] = m.end()
            counts = matched.setdefault(category, {})
            term = " ".join(m.group(0).split())
            counts[term] = counts.get(term, 0) + 1
            if len(examples) < max_examples and category != ENTITY_CATEGORY:
                lo, hi = max(m.start() - context, 0), min(m.end() + context, len(shown))
                snippet = shown[lo:m.start()] + "[" + shown[m.start():m.end()] + "]" + shown[m.end():hi]
                examples.append(f"{category}: ..." + " ".join(snippet.split()) + "...")
        matched = {c: matched[c] for c in ALL_CATEGORIES if c in matched}
        rules = [c for c in INSTANT_CATEGORIES if c in matched]
        if ENTITY_CATEGORY in matched:
            rules += [f"{ENTITY_CATEGORY}+{c}" for c in NEGATIVE_CATEGORIES if c in matched]
        return Verdict(flagged=bool(rules), rules=rules, terms=matched, examples=examples)


def _fires(found: set) -> bool:
    if any(c in found for c in INSTANT_CATEGORIES):
        return True
    return ENTITY_CATEGORY in found and any(c in found for c in NEGATIVE_CATEGORIES)
