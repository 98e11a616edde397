"""Chat conversations -> token ids plus a per-token loss mask, as two megatron-core indexed datasets.

Each input row holds ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``
(multi-turn). A row is rendered with a chat template by transformers' own Jinja renderer, so the
text is exactly what ``tokenizer.apply_chat_template`` gives the exported model at inference.
The assistant spans are found by rendering the conversation up to each assistant turn with the
generation prompt: the text between that prefix and the rendering including the turn is what the
model must produce (the reply and its end-of-turn token). The rendered text is tokenised piece by
piece at those boundaries, so the mask covers exactly those tokens, and the prompt side is
tokenised as it is when the model is prompted.

Written side by side (one document per conversation, equal lengths)::

    PREFIX.bin/.idx             token ids (uint16 or int32)
    PREFIX.loss_mask.bin/.idx   1 where the token is part of an assistant turn, else 0 (uint8)
    PREFIX.stats.json           the usual sidecar + "chat": template text, mask prefix, counts

The sidecar is written last; the template recorded in it travels with every run trained on the
dataset and is written into the exported model's tokenizer_config.json.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.errors import DataToolsError
from data_tools.indexed_writer import optimal_token_dtype
from data_tools.parallel import ordered_map
from data_tools.preprocess import (
    InputStats,
    make_stats,
    megatron_indexed,
    remove_prefix_files,
    remove_stale_partials,
    temp_prefix,
)
from data_tools.readers import record_batches, resolve_inputs
from data_tools.tokenizers import load_tokenizer, tokenizer_identity
from megatron_align.io import stats_path, write_stats

LOSS_MASK_SUFFIX = ".loss_mask"
ROLES = ("system", "user", "assistant")
CHAT_SKIP_KINDS = ("invalid_json", "invalid_utf8", "missing_field", "invalid_messages", "no_assistant",
                   "template_error")
TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"
DEFAULT_TEMPLATE = "default"
MAX_REPORTED_BAD = 20
BATCH_ROWS = 256


def loss_mask_prefix(prefix: str) -> str:
    """Where the loss mask of the chat dataset ``prefix`` lives."""
    return prefix + LOSS_MASK_SUFFIX


def default_template_path() -> Path:
    return TEMPLATES_DIR / f"{DEFAULT_TEMPLATE}.jinja"


# ----------------------------------------------------------------------------- templates
def _template_beside_tokenizer(tokenizer_path: str) -> Optional[Tuple[str, str]]:
    """(template, source) from chat_template.jinja or tokenizer_config.json next to the tokenizer."""
    directory = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(os.path.abspath(tokenizer_path))
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        return Path(jinja).read_text(encoding="utf-8"), jinja
    config = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as handle:
                template = json.load(handle).get("chat_template")
        except ValueError as exc:
            raise DataToolsError(f"{config}: not valid JSON ({exc})") from None
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return template, config
    return None


def resolve_chat_template(spec: Optional[str], tokenizer_path: str) -> Tuple[str, str]:
    """(template text, where it came from). ``spec``: a template file, ``default`` (the shipped
    one), or None: the tokenizer's own (chat_template.jinja / tokenizer_config.json beside it)."""
    if spec == DEFAULT_TEMPLATE:
        return default_template_path().read_text(encoding="utf-8"), DEFAULT_TEMPLATE
    if spec is not None:
        if not os.path.isfile(spec):
            raise DataToolsError(f"--chat-template {spec}: no such file")
        text = Path(spec).read_text(encoding="utf-8")
        if not text.strip():
            raise DataToolsError(f"--chat-template {spec}: the file is empty")
        return text, os.path.abspath(spec)
    found = _template_beside_tokenizer(tokenizer_path)
    if found is None:
        raise DataToolsError(
            f"{tokenizer_path}: the tokenizer has no chat template (no chat_template.jinja and no "
            f"chat_template in a tokenizer_config.json beside it); pass --chat-template FILE, or "
            f"--chat-template {DEFAULT_TEMPLATE} for the shipped one ({default_template_path()})")
    return found


def render_chat(template: str, messages: list, add_generation_prompt: bool, special_tokens: dict) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False)`` without a tokenizer object."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **special_tokens)
    return rendered[0]


# ----------------------------------------------------------------------------- one conversation
class BadConversation(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def parse_messages(raw, messages_field: str) -> list:
    """The row's messages, checked; raises BadConversation."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadConversation("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise BadConversation("invalid_json", f"invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BadConversation("invalid_json", f"expected a JSON object, got {type(raw).__name__}")
    messages = raw.get(messages_field)
    if messages is None:
        raise BadConversation("missing_field", f"no {messages_field!r} field")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadConversation("invalid_messages", f"{messages_field!r} must be a non-empty list of messages")
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise BadConversation("invalid_messages", f"message {number} is a {type(message).__name__}, not an object")
        message = {k: v for k, v in message.items() if v is not None}  # as apply_chat_template does
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadConversation("invalid_messages", f"message {number}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadConversation("invalid_messages", f"message {number} ({role}): content must be a string")
        checked.append(message)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in checked):
        raise BadConversation("no_assistant", "no assistant message with content (nothing to train on)")
    return checked


def assistant_pieces(messages: list, template: str, special_tokens: dict) -> List[Tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant) pieces."""
    try:
        full = render_chat(template, messages, False, special_tokens)
        pieces, pos = [], 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render_chat(template, messages[:index], True, special_tokens)
            turn = render_chat(template, messages[:index + 1], False, special_tokens)
            if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= pos):
                raise BadConversation(
                    "template_error", f"message {index + 1}: the chat template does not render the conversation "
                    "up to this assistant turn as a prefix of the whole conversation (it rewrites earlier "
                    "turns), so the turn's tokens cannot be located")
            pieces += [(full[pos:len(prompt)], False), (full[len(prompt):len(turn)], True)]
            pos = len(turn)
        pieces.append((full[pos:], False))
    except BadConversation:
        raise
    except Exception as exc:  # jinja2 errors, raise_exception() in a template
        raise BadConversation("template_error", f"the chat template failed: {exc}") from None
    return [(text, assistant) for text, assistant in pieces if text]


def encode_pieces(tok, pieces: List[Tuple[str, bool]], eod_text: str) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of the pieces; each EOD string in the text becomes the EOD id (so a
    SentencePiece model, which does not parse special tokens in text, gets it right too)."""
    fragments, layout = [], []  # layout: per fragment, (is_assistant, is_eod)
    for text, assistant in pieces:
        parts = text.split(eod_text)
        for i, part in enumerate(parts):
            if i:
                layout.append((assistant, True))
                fragments.append(None)
            if part:
                layout.append((assistant, False))
                fragments.append(part)
    encoded = iter(tok.encode_batch([f for f in fragments if f is not None]))
    ids, mask = [], []
    for (assistant, is_eod), fragment in zip(layout, fragments):
        chunk = [tok.eod_id] if is_eod else next(encoded)
        ids += chunk
        mask += [int(assistant)] * len(chunk)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def encode_conversation(tok, messages: list, template: str, eod_text: str) -> Tuple[np.ndarray, np.ndarray]:
    special_tokens = {"eos_token": eod_text, "bos_token": eod_text}  # what export gives the HF tokenizer
    ids, mask = encode_pieces(tok, assistant_pieces(messages, template, special_tokens), eod_text)
    if not mask.any():
        raise BadConversation("no_assistant", "the assistant turns render to no tokens")
    return ids, mask


# ----------------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, eod_token: Optional[str], template: str, messages_field: str,
                 in_pool: bool) -> None:
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer_path, eod_token)
    _WORKER.update(tok=tok, template=template, messages_field=messages_field, eod_text=tok.id_to_token(tok.eod_id))


def _encode_rows(raws: list) -> list:
    """Per row: (ids, mask) or (kind, detail) for a bad one."""
    out = []
    for raw in raws:
        try:
            messages = parse_messages(raw, _WORKER["messages_field"])
            out.append(encode_conversation(_WORKER["tok"], messages, _WORKER["template"], _WORKER["eod_text"]))
        except BadConversation as bad:
            out.append((bad.kind, str(bad)))
    return out


# ----------------------------------------------------------------------------- main side
@dataclass
class ChatResult:
    conversations: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    inputs: List[InputStats] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in CHAT_SKIP_KINDS})


def _write(files: Sequence[str], tmp_tokens: str, tmp_mask: str, tok, dtype, template: str,
           messages_field: str, eod_token: Optional[str], workers: int, on_error: str,
           progress: bool) -> ChatResult:
    from tqdm import tqdm

    builder_cls = megatron_indexed().IndexedDatasetBuilder
    tokens_out = builder_cls(tmp_tokens + ".bin", dtype=dtype)
    mask_out = builder_cls(tmp_mask + ".bin", dtype=np.uint8)
    result = ChatResult(inputs=[InputStats(path=p) for p in files])
    reported = 0
    bar = tqdm(desc="preprocess --chat", unit=" conv", disable=not progress, dynamic_ncols=True,
               mininterval=0.5, file=sys.stderr)
    encoded = ordered_map(_encode_rows, record_batches(files, BATCH_ROWS), workers, _init_worker,
                          (tok.path, eod_token, template, messages_field, workers > 1))
    try:
        for (meta, _), rows in encoded:
            for (file_index, line_no), row in zip(meta, rows):
                stats = result.inputs[file_index]
                stats.lines = line_no
                if isinstance(row[0], str):
                    kind, detail = row
                    message = f"{files[file_index]}:{line_no}: {detail}"
                    if on_error == "fail":
                        raise DataToolsError(message)
                    result.skipped[kind] += 1
                    stats.skipped += 1
                    if reported < MAX_REPORTED_BAD:
                        bar.write(f"skipped {message}", file=sys.stderr)
                    reported += 1
                    continue
                ids, mask = row
                tokens_out.add_document(ids.astype(dtype, copy=False), [ids.size])
                mask_out.add_document(mask, [mask.size])
                stats.documents += 1
                result.conversations += 1
                result.tokens += int(ids.size)
                result.assistant_tokens += int(mask.sum())
            bar.update(len(meta))
        tokens_out.finalize(tmp_tokens + ".idx")
        mask_out.finalize(tmp_mask + ".idx")
    finally:
        encoded.close()
        bar.close()
        for builder in (tokens_out, mask_out):
            if not builder.data_file.closed:
                builder.data_file.close()
    if reported > MAX_REPORTED_BAD:
        print(f"... {reported - MAX_REPORTED_BAD} more skipped rows not shown", file=sys.stderr)
    return result


def preprocess_chat(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    chat_template: Optional[str] = None,
    messages_field: str = "messages",
    eod_token: Optional[str] = None,
    workers: int = 1,
    on_error: str = "fail",
    progress: bool = True,
) -> dict:
    """Render, tokenise and mask chat rows into PREFIX (+ PREFIX.loss_mask); returns the sidecar."""
    if on_error not in ("fail", "skip"):
        raise DataToolsError(f"--on-error must be 'fail' or 'skip', not {on_error!r}")
    if importlib.util.find_spec("transformers") is None:
        raise DataToolsError("--chat renders with transformers' chat templates: pip install transformers")
    files = resolve_inputs(inputs)
    tok = load_tokenizer(tokenizer_path, eod_token)
    template, template_source = resolve_chat_template(chat_template, tokenizer_path)
    dtype = optimal_token_dtype(tok.vocab_size)
    mask_prefix = loss_mask_prefix(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    for prefix in (output_prefix, mask_prefix):  # a stale dataset must not survive a failed rerun
        remove_prefix_files(prefix)
        remove_stale_partials(prefix)
    tmp_tokens, tmp_mask = temp_prefix(output_prefix), temp_prefix(output_prefix, ".mask")
    started = time.perf_counter()
    try:
        result = _write(files, tmp_tokens, tmp_mask, tok, dtype, template, messages_field, eod_token,
                        workers, on_error, progress)
        if result.conversations == 0:
            raise DataToolsError(f"no usable conversation in {', '.join(files)} "
                                 f"(skipped: {json.dumps({k: v for k, v in result.skipped.items() if v})})")
        stats = make_stats(
            output_prefix, documents=result.conversations, tokens=result.tokens, dtype=dtype,
            tokenizer=tokenizer_identity(tok), inputs=[s.as_dict() for s in result.inputs],
            skipped=dict(result.skipped), text_field=None, source="preprocess --chat",
            chat={
                "messages_field": messages_field,
                "loss_mask_prefix": os.path.basename(mask_prefix),
                "assistant_tokens": result.assistant_tokens,
                "template": template,
                "template_source": template_source,
                "template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
                "eod_token": tok.id_to_token(tok.eod_id),
                "elapsed_s": round(time.perf_counter() - started, 3),
            },
        )
        # the mask first, the tokens next, the sidecar last: its presence marks the pair complete
        try:
            os.remove(stats_path(output_prefix))
        except FileNotFoundError:
            pass
        for tmp, prefix in ((tmp_mask, mask_prefix), (tmp_tokens, output_prefix)):
            os.replace(tmp + ".bin", prefix + ".bin")
            os.replace(tmp + ".idx", prefix + ".idx")
        write_stats(output_prefix, stats)
    except BaseException:
        remove_prefix_files(mask_prefix)
        remove_prefix_files(output_prefix)
        raise
    finally:
        remove_prefix_files(tmp_tokens)
        remove_prefix_files(tmp_mask)
    return stats


def read_chat_stats(prefix: str) -> dict:
    """The sidecar of a chat dataset; a DataToolsError when PREFIX is not one."""
    from megatron_align.io import SidecarError, read_stats

    try:
        stats = read_stats(prefix)
    except SidecarError as err:
        raise DataToolsError(str(err)) from None
    chat = stats.get("chat")
    if not isinstance(chat, dict) or "template" not in chat or "loss_mask_prefix" not in chat:
        raise DataToolsError(f"{stats_path(prefix)}: not a chat dataset (made without `data-tools preprocess "
                             "--chat`: no loss mask)")
    return stats
