"""Batched log-likelihood of continuations under an HF causal LM.

Tokenisation and the request grouping follow lm-eval's HFLM (`_encode_pair`,
one-token-continuation grouping, right padding, left truncation), so the native runner
and the lm-eval task score the same token sequences."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_and_tokenizer(model_dir: str, device: str = "auto", dtype: str = "auto"):
    """The HF model (checkpoint dtype by default, like lm-eval) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.to(resolve_device(device)).eval()
    return model, tokenizer


def model_max_length(model, tokenizer, default: int = 2048) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value and value < 1_000_000:
        return int(value)
    return default


@dataclass
class _Group:
    tokens: list[int]                       # model input: context + continuation[:-1]
    members: list[tuple[int, list[int]]]    # (request index, continuation tokens)


class LogLikelihoodScorer:
    """score([(context, continuation), ...]) -> [sum log p(continuation | context), ...]"""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 show_progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.show_progress = show_progress
        self.device = next(model.parameters()).device
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_str = tokenizer.decode(prefix_id) if prefix_id is not None else None
        self._keep_positions = True
        self._encode_cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        cached = self._encode_cache.get(text)
        if cached is None:
            cached = self._encode_cache[text] = self._encode(text)
        return cached

    def _encode(self, text: str) -> list[int]:
        # Like lm-eval: the tokenizer's default special tokens, unless the text already
        # starts with the BOS/EOS string (a rendered chat template often does).
        if self._prefix_str and text.startswith(self._prefix_str):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_tokens = self.encode(context)
        return context_tokens, whole[len(context_tokens):]

    def _groups(self, requests: list[tuple[str, str]]) -> list[_Group]:
        groups: dict[tuple[int, ...], _Group] = {}
        for index, (context, continuation) in enumerate(requests):
            ctx, cont = self.encode_pair(context, continuation)
            if not ctx or not cont:
                raise ValueError(f"request {index}: empty context or continuation after tokenisation")
            key = tuple(ctx + cont[:-1])
            group = groups.setdefault(key, _Group(list(key), []))
            group.members.append((index, cont))
        # longest first, as lm-eval does: the first batch shows the peak memory
        return sorted(groups.values(), key=lambda g: (-len(g.tokens), g.tokens))

    def _forward_logprobs(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Log-softmax at `positions` (sorted sequence indices) only: the LM head and softmax
        over a 50k vocabulary at every position would dominate the time for short answers."""
        if self._keep_positions:
            try:
                logits = self.model(ids, logits_to_keep=positions).logits
                return F.log_softmax(logits, dim=-1)
            except TypeError:  # a model class without logits_to_keep
                self._keep_positions = False
        return F.log_softmax(self.model(ids).logits[:, positions], dim=-1)

    @torch.no_grad()
    def score(self, requests: list[tuple[str, str]]) -> list[float]:
        self._encode_cache.clear()
        results: list[float | None] = [None] * len(requests)
        groups = self._groups(requests)
        bar = tqdm(total=len(requests), desc="scoring", unit="req", disable=not self.show_progress)
        for start in range(0, len(groups), self.batch_size):
            batch = groups[start:start + self.batch_size]
            inputs = [g.tokens[-self.max_length:] for g in batch]
            width = max(len(t) for t in inputs)
            ids = torch.zeros((len(inputs), width), dtype=torch.long)
            for row, tokens in enumerate(inputs):
                ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            # positions whose logits predict a continuation token, per member
            wanted = [[range(len(tokens) - len(cont), len(tokens)) for _, cont in group.members]
                      for group, tokens in zip(batch, inputs)]
            keep = sorted({p for rows in wanted for r in rows for p in r})
            column = {p: i for i, p in enumerate(keep)}
            logprobs = self._forward_logprobs(ids.to(self.device), torch.tensor(keep, device=self.device))
            for row, (group, spans) in enumerate(zip(batch, wanted)):
                for (index, cont), span in zip(group.members, spans):
                    cols = torch.tensor([column[p] for p in span], device=self.device)
                    targets = torch.tensor(cont, dtype=torch.long, device=self.device)
                    results[index] = float(logprobs[row, cols, targets].sum())
                bar.update(len(group.members))
        bar.close()
        return results  # type: ignore[return-value]
