"""`data-tools index-stats`: the stats sidecar for a `.bin/.idx` made by another tool.

Megatron-LM's and GPT-NeoX's `preprocess_data.py` write the same megatron indexed format but
no `PREFIX.stats.json`. Counts come from the `.idx` alone (megatron-core `IndexedDataset`:
sequence lengths and document indices, memory-mapped), so they take seconds however large the
`.bin` is. Only a random sample of documents is read, to check that its ids fit the tokenizer's
vocabulary (an id >= vocab means another tokenizer made it: an error, no sidecar) and that
documents end with its EOD token (a warning, recorded in the sidecar).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Optional

import numpy as np

from data_tools.errors import DataToolsError
from data_tools.indexed_writer import optimal_token_dtype
from data_tools.preprocess import make_stats, open_indexed
from data_tools.tokenizers import load_tokenizer, tokenizer_identity
from megatron_align.io import STATS_DTYPES, read_stats, stats_path, write_stats

SAMPLE_DOCUMENTS = 256  # random reads: ~3 s at 10 ms a seek (network or spinning storage)
LENGTH_CHUNK = 1 << 24  # sequence lengths summed per step (64 MiB of int32)


def sum_lengths(lengths: np.ndarray, progress: bool) -> int:
    """Total tokens of a (memory-mapped) int32 length array, in chunks, with a progress bar."""
    from tqdm import tqdm

    total = 0
    with tqdm(total=len(lengths), desc="index", unit=" seqs", unit_scale=True, disable=not progress,
              dynamic_ncols=True, mininterval=0.5, file=sys.stderr) as bar:
        for start in range(0, len(lengths), LENGTH_CHUNK):
            chunk = lengths[start:start + LENGTH_CHUNK]
            total += int(chunk.sum(dtype=np.int64))
            bar.update(len(chunk))
    return total


def _token(tok, token_id: int) -> str:
    return repr(tok.decode([token_id]))


def index_stats(
    prefix: str,
    tokenizer_path: str,
    *,
    eod_token: Optional[str] = None,
    samples: int = SAMPLE_DOCUMENTS,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write and return PREFIX.stats.json for an existing PREFIX.bin/.idx (see the module doc)."""
    from tqdm import tqdm

    sidecar = stats_path(prefix)
    if os.path.exists(sidecar) and not force:
        try:
            made_by = f" (made by {read_stats(prefix).get('source', 'preprocess')})"
        except Exception:  # noqa: BLE001 - an unreadable sidecar is still one to refuse to replace
            made_by = ""
        raise DataToolsError(f"{sidecar}: already exists{made_by}; pass --force to replace it")
    if samples < 0:
        raise DataToolsError(f"--samples must be >= 0, not {samples}")
    tok = load_tokenizer(tokenizer_path, eod_token)
    ds = open_indexed(prefix)
    index = ds.index
    dtype = np.dtype(index.dtype).name
    if dtype not in STATS_DTYPES:
        raise DataToolsError(f"{prefix}.idx: tokens are {dtype}; a sidecar records {' or '.join(STATS_DTYPES)} only "
                             "(re-tokenise with `data-tools preprocess`)")
    lengths = index.sequence_lengths
    sequences = len(lengths)
    documents = len(index.document_indices) - 1
    tokens = sum_lengths(lengths, progress)
    warnings = []

    # The .bin must hold every byte the index points at (a truncated copy is common at scale).
    needed = int(index.sequence_pointers[-1]) + int(lengths[-1]) * index.dtype_size if sequences else 0
    size = os.path.getsize(prefix + ".bin")
    if size < needed:
        raise DataToolsError(f"{prefix}.bin: {size:,} bytes but {prefix}.idx points at {needed:,}: truncated copy? "
                             "no sidecar written")
    if size > needed:
        warnings.append(f"{prefix}.bin has {size - needed:,} bytes after the last document the index points at")
    if documents != sequences:
        warnings.append(f"the index groups {sequences:,} sequences into {documents:,} documents (sentence-split?); "
                        "'documents' counts sequences, as megatron-core's GPTDataset does")
    if dtype == "uint16" and tok.vocab_size > 1 << 16:
        warnings.append(f"uint16 tokens cannot hold ids >= 65,536 but {tok.path} has {tok.vocab_size:,}: "
                        f"made with another tokenizer? (data-tools preprocess writes {np.dtype(optimal_token_dtype(tok.vocab_size)).name})")

    # Read a sample of documents: ids within the vocabulary, EOD last.
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(documents, size=min(samples, documents), replace=False)) if documents else []
    doc_index = index.document_indices
    out_of_vocab, last_ids, max_id = [], Counter(), -1
    for doc in tqdm(picks, desc="check", unit=" docs", disable=not progress, dynamic_ncols=True,
                    mininterval=0.5, file=sys.stderr):
        doc = int(doc)
        parts = [ds.get(int(s)) for s in range(int(doc_index[doc]), int(doc_index[doc + 1]))]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=index.dtype)
        if ids.size:
            top, bottom = int(ids.max()), int(ids.min())
            max_id = max(max_id, top)
            if top >= tok.vocab_size or bottom < 0:
                out_of_vocab.append((doc, top if top >= tok.vocab_size else bottom))
        last_ids[int(ids[-1]) if ids.size else None] += 1
    checked = len(picks)
    if out_of_vocab:
        doc, bad = out_of_vocab[0]
        raise DataToolsError(
            f"{prefix}.bin: {len(out_of_vocab):,} of {checked:,} sampled documents hold token ids outside "
            f"[0, {tok.vocab_size:,}) (the vocabulary of {tok.path}), e.g. document {doc} holds id {bad}: "
            "tokenised with another tokenizer? no sidecar written")
    ending_with_eod = last_ids[tok.eod_id]
    if ending_with_eod < checked:
        others = [(i, n) for i, n in last_ids.most_common() if i != tok.eod_id]
        common, count = others[0]
        ends = "are empty" if common is None else f"end with id {common} {_token(tok, common)}"
        warnings.append(
            f"{checked - ending_with_eod:,} of {checked:,} sampled documents do not end with the EOD token "
            f"{tok.eod_id} {_token(tok, tok.eod_id)} of {tok.path} ({count:,} {ends}): tokenised without "
            "--append-eod, or with another EOD token? Training would run those documents together")

    stats = make_stats(
        prefix, documents=sequences, tokens=tokens, dtype=dtype, tokenizer=tokenizer_identity(tok),
        inputs=[], skipped={}, text_field=None, source="index-stats",
        check={"sampled_documents": checked, "seed": seed, "max_id": max_id, "ending_with_eod": ending_with_eod},
        warnings=warnings,
    )
    write_stats(prefix, stats)
    return stats
