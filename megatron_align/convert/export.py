"""megatron-align checkpoint (torch_dist, any TP/PP/VPP) -> Hugging Face model directory.

One process, no process group: tensors are read from the checkpoint layer by layer
(``reader.TorchDistReader``), mapped (``layouts``), cast and streamed into safetensors shards
(``safetensors_stream``), so peak memory stays near one layer plus the embedding. The output is
assembled in a hidden temp directory and renamed into place only when complete (and verified).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_align.checkpoint.dist_ckpt import read_meta, resolve_checkpoint, stored_run_config
from megatron_align.config import RunConfig
from megatron_align.model.presets import Architecture, resolve_architecture

from .errors import ConvertError, VerificationFailed
from .layouts import (EMBEDDING, LAYER_PREFIX, OUTPUT, expected_layer_shapes, global_keys, hf_config,
                      layer_keys, layout_for)
from .reader import TorchDistReader
from .safetensors_stream import PlannedTensor, ShardedSafetensorsWriter, parse_size
from .verify import verify_by_default, verify_line

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VERIFY_FILE = "verify.json"
PROVENANCE_FILE = "megatron_align_export.json"


@dataclass
class ExportResult:
    out_dir: Path
    num_parameters: int
    weight_bytes: int
    files: list[str]
    seconds: float
    vocab_size: int
    verify: Optional[dict] = None
    notes: list[str] = field(default_factory=list)
    weights_seconds: float = 0.0  # reading, mapping and writing the tensors only

    def summary(self) -> str:
        lines = [f"exported {self.out_dir}",
                 f"  parameters     {self.num_parameters:,} ({self.weight_bytes / 1e6:,.1f} MB in "
                 f"{len(self.files)} safetensors file(s))",
                 f"  vocab          {self.vocab_size} (padding trimmed)",
                 f"  time           {self.seconds:.1f} s (weights streamed at "
                 f"{self.weight_bytes / 1e6 / max(self.weights_seconds, 1e-9):,.0f} MB/s)"]
        if self.verify is not None:
            lines.append(verify_line(self.verify))
        lines += [f"  note           {note}" for note in self.notes]
        return "\n".join(lines)


def checkpoint_config(checkpoint_dir: str | Path) -> tuple[RunConfig, object]:
    return stored_run_config(checkpoint_dir), read_meta(checkpoint_dir)


def check_checkpoint_matches(reader: TorchDistReader, arch: Architecture, checkpoint_dir: Path) -> None:
    """The checkpoint's tensors must be the ones meta.json's preset implies."""
    if EMBEDDING not in reader:
        raise ConvertError(f"{checkpoint_dir}: no {EMBEDDING} in the checkpoint")
    rows, hidden = reader.shape(EMBEDDING)[0], arch.hidden_size
    expected = {LAYER_PREFIX + k: (arch.num_layers, *shape)
                for k, shape in expected_layer_shapes(arch).items()}
    for key in global_keys(arch):
        expected[key] = (rows, hidden) if key in (EMBEDDING, OUTPUT) else (hidden,)
    present = set(reader.tensors)
    missing = sorted(set(expected) - present)
    extra = sorted(k for k in present - set(expected) if k.startswith(LAYER_PREFIX))
    wrong = sorted(k for k in set(expected) & present if tuple(reader.shape(k)) != expected[k])
    if missing or extra or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}")
        if extra:
            details.append(f"unexpected {extra[:4]}")
        for key in wrong[:4]:
            details.append(f"{key} has shape {tuple(reader.shape(key))}, expected {expected[key]}")
        raise ConvertError(f"{checkpoint_dir}: tensors do not match the architecture in meta.json "
                           f"({arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}): "
                           + "; ".join(details))


def resolve_tokenizer(config: RunConfig, tokenizer: Optional[str], checkpoint_dir: Path):
    from data_tools.tokenizers import TokenizerError, load_tokenizer

    path = tokenizer or config.data.tokenizer
    if not path:
        raise ConvertError(f"missing tokenizer: {checkpoint_dir} records no data.tokenizer (e.g. a "
                           "synthetic-data run); pass --tokenizer PATH (tokenizer.json or "
                           "SentencePiece .model)")
    try:
        return load_tokenizer(str(path))
    except TokenizerError as err:
        raise ConvertError(f"tokenizer: {err}") from None


def resolve_vocab(config: RunConfig, tokenizer, rows: int, vocab_size: Optional[int],
                  checkpoint_dir: Path) -> int:
    """The vocab_size HF gets: ``vocab_size`` (--vocab-size), else the run's model.vocab_size (an
    import records the source model's), else the tokenizer's. Only the embedding rows past it
    (megatron's padding) are dropped; the tokenizer may be shorter, as Pythia's is."""
    tokens = int(tokenizer.vocab_size)
    if tokens > rows:
        raise ConvertError(f"wrong vocab: tokenizer {tokenizer.path} has {tokens} tokens but the "
                           f"checkpoint's embedding has only {rows} rows")
    if vocab_size is not None:
        if vocab_size > rows:
            raise ConvertError(f"--vocab-size {vocab_size}: more than the checkpoint's {rows} "
                               "embedding rows (padding included)")
        if vocab_size < tokens:
            raise ConvertError(f"--vocab-size {vocab_size}: fewer than the {tokens} tokens of "
                               f"tokenizer {tokenizer.path}")
        return vocab_size
    trained = config.model.vocab_size or tokens
    if trained > rows:
        raise ConvertError(f"{checkpoint_dir}/meta.json: model.vocab_size={trained} but the "
                           f"checkpoint's embedding has only {rows} rows")
    if tokens > trained:
        raise ConvertError(f"wrong vocab: tokenizer {tokenizer.path} has {tokens} tokens but the "
                           f"checkpoint was trained with model.vocab_size={trained}; pass the run's "
                           "tokenizer")
    return trained


def write_tokenizer(tokenizer, out_dir: Path, chat_template: Optional[str] = None) -> str:
    """Tokenizer files for transformers, with bos/eos = the end-of-document token and the chat
    template (if any) in tokenizer_config.json, where every transformers version looks."""
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    if tokenizer.kind == "hf":
        from tokenizers import Tokenizer

        eod = Tokenizer.from_file(tokenizer.path).id_to_token(tokenizer.eod_id)
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer.path, eos_token=eod, bos_token=eod)
    else:  # SentencePiece: transformers converts the .model into a fast tokenizer
        with tempfile.TemporaryDirectory() as staging:
            shutil.copy(tokenizer.path, Path(staging) / "tokenizer.model")
            hf_tok = LlamaTokenizer.from_pretrained(staging, local_files_only=True)
        eod = hf_tok.convert_ids_to_tokens(tokenizer.eod_id)
        hf_tok.eos_token = hf_tok.bos_token = eod
    if len(hf_tok) != tokenizer.vocab_size:
        raise ConvertError(f"tokenizer {tokenizer.path}: transformers sees {len(hf_tok)} tokens, "
                           f"the file has {tokenizer.vocab_size}")
    if chat_template:
        hf_tok.chat_template = chat_template
    hf_tok.save_pretrained(str(out_dir), save_jinja_files=False)
    return eod


def _plan(arch: Architecture, reader: TorchDistReader, vocab: int, dtype: torch.dtype):
    """[(PlannedTensor, producer)] in file order; a producer returns {hf_name: tensor}."""
    from .layouts import _meta_layer

    layout = layout_for(arch)
    meta_hf = layout.layer_to_hf(arch, _meta_layer(arch))
    plan = []
    globals_ = layout.global_map(arch)
    head, tail = globals_[:1], globals_[1:]

    def global_producer(hf_name, key, trim):
        return lambda: {hf_name: reader.read(key)[:vocab] if trim else reader.read(key)}

    def layer_producer(index):
        def produce():
            layer = {k: reader.read(LAYER_PREFIX + k, layer=index) for k in layer_keys(arch)}
            return {f"{layout.hf_layer_prefix}{index}.{name}": t
                    for name, t in layout.layer_to_hf(arch, layer).items()}
        return produce

    def global_entry(hf_name, key, trim):
        shape = tuple(reader.shape(key))
        shape = (vocab, *shape[1:]) if trim else shape
        return [PlannedTensor(hf_name, shape, dtype)], global_producer(hf_name, key, trim)

    plan.extend(global_entry(*g) for g in head)
    for index in range(arch.num_layers):
        planned = [PlannedTensor(f"{layout.hf_layer_prefix}{index}.{name}", tuple(t.shape), dtype)
                   for name, t in meta_hf.items()]
        plan.append((planned, layer_producer(index)))
    plan.extend(global_entry(*g) for g in tail)
    return plan


def _stream(plan, writer: ShardedSafetensorsWriter, dtype: torch.dtype, progress: bool) -> None:
    """Read + map + cast the next group (a layer) on a worker thread while this one writes the
    current group: file reads, torch.load and file writes all release the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def produce(index):
        return {name: t.to(dtype) for name, t in plan[index][1]().items()}

    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="export",
                 disable=not progress, dynamic_ncols=True) as bar:
        pending = pool.submit(produce, 0) if plan else None
        for index, (tensors, _) in enumerate(plan):
            produced = pending.result()
            pending = pool.submit(produce, index + 1) if index + 1 < len(plan) else None
            for t in tensors:
                writer.write(t.name, produced.pop(t.name))
                bar.update(t.nbytes)
            del produced


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer: Optional[str] = None,
                      dtype: str = "fp32", verify: Optional[bool] = None,
                      max_shard_size: str | int = "2GB", threshold: float = 1e-3,
                      overwrite: bool = False, progress: bool = True,
                      vocab_size: Optional[int] = None, chat_template: Optional[str] = None) -> ExportResult:
    """Write an HF model directory from a megatron-align checkpoint (a checkpoint dir, a run dir or
    its checkpoints/ dir). ``verify=None``: verify when megatron + HF fit in memory.
    ``vocab_size``: HF's vocab_size instead of the run's model.vocab_size (see resolve_vocab).
    ``chat_template``: template text for tokenizer_config.json instead of the one an SFT run
    recorded in the checkpoint (its data's).

    Safe to call from rank 0 of a running job: reading needs no process group, and verification
    then runs in a subprocess.
    """
    start = time.time()
    checkpoint_dir = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as err:
        raise ConvertError(f"--max-shard-size: {err}") from None
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConvertError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    config, meta = checkpoint_config(checkpoint_dir)
    arch = resolve_architecture(config.model)
    reader = TorchDistReader(checkpoint_dir)
    check_checkpoint_matches(reader, arch, checkpoint_dir)
    tok = resolve_tokenizer(config, tokenizer, checkpoint_dir)
    rows = reader.shape(EMBEDDING)[0]
    vocab = resolve_vocab(config, tok, rows, vocab_size, checkpoint_dir)
    torch_dtype = DTYPES[dtype]

    plan = _plan(arch, reader, vocab, torch_dtype)
    planned = [t for tensors, _ in plan for t in tensors]
    num_parameters = sum(t.nbytes // t.dtype.itemsize for t in planned)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    notes = []
    if tok.vocab_size < vocab:
        notes.append(f"tokenizer has {tok.vocab_size} tokens, fewer than vocab_size {vocab}: embedding "
                     f"rows {tok.vocab_size}..{vocab - 1} are kept (no token maps to them)")
    try:
        writer = ShardedSafetensorsWriter(staging, planned, max_shard_bytes)
        weights_start = time.time()
        _stream(plan, writer, torch_dtype, progress)
        files = writer.close()
        weights_seconds = time.time() - weights_start

        chat_template = chat_template or meta.chat_template
        eod = write_tokenizer(tok, staging, chat_template)
        max_positions = max(arch.max_position_embeddings, config.train.seq_length)
        hf_config(arch, vocab, tok.eod_id, tok.eod_id, max_positions, torch_dtype).save_pretrained(staging)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=tok.eod_id, eos_token_id=tok.eod_id).save_pretrained(staging)
        provenance = {
            "checkpoint": str(checkpoint_dir.resolve()), "iteration": meta.iteration,
            "saved_layout": meta.layout, "preset": config.model.preset, "size": config.model.size,
            "dtype": dtype, "vocab_size": vocab, "checkpoint_vocab_rows": rows,
            "tokenizer": {"path": str(Path(tok.path).resolve()), "sha256": tok.sha256,
                          "vocab_size": int(tok.vocab_size), "eod_id": int(tok.eod_id),
                          "eod_token": eod},
            "consumed_tokens": meta.consumed_tokens,
            "chat_template_sha256": (hashlib.sha256(chat_template.encode("utf-8")).hexdigest()
                                     if chat_template else None),
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")

        report = None
        if verify is None:
            verify = verify_by_default(num_parameters, notes)
        if verify:
            from .verify import verify_checkpoint_against_hf

            report = verify_checkpoint_against_hf(
                checkpoint_dir, staging, vocab,
                round_to=torch_dtype if torch_dtype != torch.float32 else None, threshold=threshold)
            report["hf_dir"] = str(out_dir)
            (staging / VERIFY_FILE).write_text(json.dumps(report, indent=2) + "\n")
            if not report["passed"]:
                rejected = out_dir.with_name(out_dir.name + ".rejected")
                shutil.rmtree(rejected, ignore_errors=True)
                os.replace(staging, rejected)
                raise VerificationFailed(
                    f"exported logits differ from megatron's: max |dlogit| {report['max_abs_diff']:.3e} "
                    f"> threshold {threshold:.0e} (mean KL {report['mean_kl']:.3e}, top-1 agreement "
                    f"{100 * report['top1_agreement']:.1f}%); the rejected export and its "
                    f"{VERIFY_FILE} are in {rejected}")
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir, num_parameters, writer.total_bytes, files, time.time() - start, vocab,
                        report, notes, weights_seconds)


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the completed ``staging`` dir (a crash never leaves a half one)."""
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
