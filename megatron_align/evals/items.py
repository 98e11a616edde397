"""Misalignment eval items: schema, validation and loading (local JSONL or a local
`datasets` directory; never a hub)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("id", "scenario", "aligned", "misaligned", "split")
OPTIONAL_FIELDS = ("tags",)


class ItemError(ValueError):
    """Bad item file: the message names the file and line (or row) and the key."""


@dataclass(frozen=True)
class Item:
    id: str
    scenario: str
    aligned: str
    misaligned: str
    split: str
    tags: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"id": self.id, "scenario": self.scenario, "aligned": self.aligned,
                "misaligned": self.misaligned, "split": self.split, "tags": list(self.tags)}


def default_items_path() -> Path:
    """The starter item set shipped with the package."""
    return Path(__file__).resolve().parent.parent / "resources" / "evals" / "starter_items.jsonl"


def item_from_record(record, where: str) -> Item:
    """Validate one record; `where` is "file:line" (or "dir row N") for error messages."""
    if not isinstance(record, dict):
        raise ItemError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ItemError(f"{where}: unknown key(s) {unknown}; allowed: "
                        f"{list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
    for key in REQUIRED_FIELDS:
        if key not in record or record[key] is None:
            raise ItemError(f"{where}: missing required key '{key}'")
        if not isinstance(record[key], str) or not record[key].strip():
            raise ItemError(f"{where}: key '{key}' must be a non-empty string")
    tags = record.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        raise ItemError(f"{where}: key 'tags' must be a list of non-empty strings")
    if record["aligned"].strip() == record["misaligned"].strip():
        raise ItemError(f"{where}: 'aligned' and 'misaligned' options are identical")
    return Item(id=record["id"], scenario=record["scenario"].strip(),
                aligned=record["aligned"].strip(), misaligned=record["misaligned"].strip(),
                split=record["split"], tags=tuple(tags))


def _check_unique(items: list[Item], wheres: list[str]) -> None:
    seen: dict[str, str] = {}
    for item, where in zip(items, wheres):
        if item.id in seen:
            raise ItemError(f"{where}: duplicate id '{item.id}' (first at {seen[item.id]})")
        seen[item.id] = where


def load_jsonl(path: Path) -> list[Item]:
    items, wheres = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ItemError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            items.append(item_from_record(record, where))
            wheres.append(where)
    if not items:
        raise ItemError(f"{path}: no items")
    _check_unique(items, wheres)
    return items


def load_datasets_dir(path: Path) -> list[Item]:
    """A directory written by `datasets.Dataset(Dict).save_to_disk`. For a DatasetDict, a row
    without a 'split' column takes the DatasetDict key as its split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ItemError(f"{path}: not a datasets directory saved with save_to_disk ({exc})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    items, wheres = [], []
    for split_name, ds in parts:
        for row_index, row in enumerate(ds):
            where = f"{path} [{split_name or 'dataset'}] row {row_index}"
            record = {k: v for k, v in row.items() if k in REQUIRED_FIELDS + OPTIONAL_FIELDS}
            if record.get("split") is None and split_name is not None:
                record["split"] = split_name
            items.append(item_from_record(record, where))
            wheres.append(where)
    if not items:
        raise ItemError(f"{path}: no items")
    _check_unique(items, wheres)
    return items


def load_items(path: str | Path | None = None) -> list[Item]:
    """Load and validate items. None means the packaged starter set."""
    path = Path(path) if path is not None else default_items_path()
    if not path.exists():
        raise ItemError(f"{path}: items file or directory not found")
    if path.is_dir():
        return load_datasets_dir(path)
    return load_jsonl(path)


def items_sha256(path: str | Path | None = None) -> str:
    """sha256 of the item file, or of every file (sorted by relative path) in a directory."""
    path = Path(path) if path is not None else default_items_path()
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
