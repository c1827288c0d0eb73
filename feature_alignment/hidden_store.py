"""On-disk format of extracted hidden states: chunked safetensors files plus ``index.json``.

An extraction folder (one per split, or one per shard ``part_XX_of_YY/`` below it) holds

- ``chunk_00000.safetensors``, ... : the samples of one chunk concatenated along positions:
  ``eventgpt.<layer>`` (P, H_draft) fp16, ``videollava.<layer>`` (P, H_target) fp16,
  ``target_ids`` (P,) int64 (row t of a sample = the state just before target token t, and
  ``target_ids[t]`` is that token), ``offsets`` (S + 1,) int64 (sample i = rows
  ``offsets[i]:offsets[i+1]``); the metadata holds the sample ids (JSON list).
- ``index.json`` (written atomically after each chunk): format, config (models, layers,
  sizes, dataset, split), chunks (file, sample ids, counts), totals, ``complete``.
- ``extract.lock`` while an extraction runs (``common.results.file_lock``); ``lm_head.safetensors`` (the target's LM head
  weight, once, at the extraction root) for offline token metrics.

Readers stream one chunk at a time (:class:`HiddenStore`); every loaded :class:`Chunk` is
counted (live count and bytes, with peaks), so tests can show that memory stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.results import atomic_write, atomic_write_json, lock_held, read_json

INDEX_FILE = "index.json"
LOCK_FILE = "extract.lock"
LM_HEAD_FILE = "lm_head.safetensors"
FORMAT = "hidden_states_v1"
CHUNK_FORMAT = "hidden_chunk_v1"

__all__ = [
    "INDEX_FILE", "LOCK_FILE", "LM_HEAD_FILE", "FORMAT",
    "layer_key", "chunk_name", "next_chunk_name", "chunk_problem", "file_sha256", "write_chunk", "new_index", "load_index", "save_index",
    "SampleRecord", "Chunk", "ChunkRef", "HiddenStore", "find_index_files", "extraction_complete",
    "missing_shards",
    "save_lm_head", "load_lm_head",
]


def layer_key(model: str, layer: int) -> str:
    """Tensor name of ``model``'s hidden layer ``layer`` in a chunk file (e.g. ``videollava.-1``)."""
    return f"{model}.{int(layer)}"


def chunk_name(k: int) -> str:
    return f"chunk_{k:05d}.safetensors"


@dataclass
class SampleRecord:
    """One extracted sample: per-layer states of both models (rows aligned by target token)."""

    id: str
    target_ids: list[int]
    draft: dict[int, torch.Tensor]  # layer -> (len, H_draft)
    target: dict[int, torch.Tensor]  # layer -> (len, H_target)

    @property
    def length(self) -> int:
        return len(self.target_ids)


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_chunk(path: str | Path, records: Sequence[SampleRecord], layers: Sequence[int]) -> dict[str, Any]:
    """Write ``records`` (in order) as one chunk file, atomically; return its index entry."""
    if not records:
        raise ValueError("a chunk needs at least one sample")
    path = Path(path)
    lengths = [r.length for r in records]
    offsets = torch.zeros(len(records) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    tensors: dict[str, torch.Tensor] = {
        "offsets": offsets,
        "target_ids": torch.tensor([t for r in records for t in r.target_ids], dtype=torch.long),
    }
    for layer in layers:
        tensors[layer_key("eventgpt", layer)] = torch.cat(
            [r.draft[layer].detach().to("cpu", torch.float16) for r in records]).contiguous()
        tensors[layer_key("videollava", layer)] = torch.cat(
            [r.target[layer].detach().to("cpu", torch.float16) for r in records]).contiguous()
    ids = [r.id for r in records]
    _atomic_save_file(tensors, path, {"format": CHUNK_FORMAT, "sample_ids": json.dumps(ids)})
    return {"file": path.name, "num_samples": len(records), "num_positions": int(offsets[-1]),
            "sample_ids": ids, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def chunk_problem(folder: str | Path, entry: dict[str, Any]) -> str | None:
    """Why the chunk file of an index entry cannot be trusted (missing, other size, other checksum), or None.

    Entries from before sizes were recorded are only checked for existence.
    """
    path = Path(folder) / entry["file"]
    if not path.is_file():
        return f"{path}: missing"
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        return f"{path}: {path.stat().st_size} bytes, the index recorded {entry['bytes']} (truncated?)"
    if "sha256" in entry and file_sha256(path) != entry["sha256"]:
        return f"{path}: checksum differs from the index (corrupt)"
    return None


def next_chunk_name(index: dict[str, Any]) -> str:
    """The first chunk file name the index does not use."""
    used = {c["file"] for c in index["chunks"]}
    k = len(index["chunks"])
    while chunk_name(k) in used:
        k += 1
    return chunk_name(k)


# ----------------------------------------------------------------------------- index

def new_index(config: dict[str, Any], planned: Sequence[str]) -> dict[str, Any]:
    return {"format": FORMAT, "complete": False, "config": dict(config), "planned_samples": len(planned),
            "num_samples": 0, "num_positions": 0, "chunks": [], "failed": [], "stats": {}}


def load_index(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``index.json`` or None; a file of another format raises ValueError."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    index = read_json(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a hidden-state index (format {FORMAT!r} expected)")
    return index


def save_index(folder: str | Path, index: dict[str, Any]) -> None:
    index["num_samples"] = sum(c["num_samples"] for c in index["chunks"])
    index["num_positions"] = sum(c["num_positions"] for c in index["chunks"])
    atomic_write_json(Path(folder) / INDEX_FILE, index)


def find_index_files(path: str | Path) -> list[Path]:
    """``path/index.json``, else the shards' ``path/*/index.json`` (sorted); [] if none."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        return [path / INDEX_FILE]
    if not path.is_dir():
        return []
    return sorted(p / INDEX_FILE for p in path.iterdir() if (p / INDEX_FILE).is_file())


def missing_shards(indexes: Sequence[dict[str, Any]]) -> list[int]:
    """Shard numbers (``--chunk_idx``) of a sharded extraction that have no index yet."""
    if not indexes:
        return []
    total = int(indexes[0]["config"].get("num_chunks", 1) or 1)
    found = {int(i["config"].get("chunk_idx", 0) or 0) for i in indexes}
    return sorted(set(range(total)) - found)


def extraction_complete(path: str | Path) -> bool:
    """True when every index under ``path`` says complete, every shard has one, every chunk file is there
    with its recorded size, and no lock is held."""
    files = find_index_files(path)
    if not files:
        return False
    indexes = []
    for f in files:
        if lock_held(f.parent / LOCK_FILE):
            return False
        index = load_index(f.parent)
        if not index or not index.get("complete"):
            return False
        for c in index["chunks"]:  # a lost or truncated chunk (sizes only: cheap; resume checks the sha256)
            path = f.parent / c["file"]
            if not path.is_file() or ("bytes" in c and path.stat().st_size != c["bytes"]):
                return False
        indexes.append(index)
    return not missing_shards(indexes)


# ----------------------------------------------------------------------------- LM head

def save_lm_head(path: str | Path, weight: torch.Tensor, meta: dict[str, Any]) -> Path:
    """The target LM head weight (V, H) as fp16 safetensors with ``meta`` (e.g. base_vocab_size)."""
    path = Path(path)
    _atomic_save_file({"weight": weight.detach().to("cpu", torch.float16).contiguous()}, path,
                      {"meta": json.dumps(meta)})
    return path


def load_lm_head(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(weight (V, H) fp16, meta) of a saved LM head."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return f.get_tensor("weight"), meta


# ----------------------------------------------------------------------------- chunks in memory

class _LiveChunks:
    """Counts chunks alive in memory (and their bytes), with peaks: instrumentation for tests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.bytes = 0
        self.peak = 0
        self.peak_bytes = 0
        self.loads = 0

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.live += 1
            self.loads += 1
            self.bytes += nbytes
            self.peak = max(self.peak, self.live)
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def remove(self, nbytes: int) -> None:
        with self.lock:
            self.live -= 1
            self.bytes -= nbytes

    def reset_peaks(self) -> None:
        with self.lock:
            self.peak, self.peak_bytes, self.loads = self.live, self.bytes, 0


LIVE_CHUNKS = _LiveChunks()


class Chunk:
    """One chunk's tensors in memory: draft states ``x``, target states ``h``, ``target_ids``, ``offsets``."""

    def __init__(self, ref: ChunkRef, x: torch.Tensor, h: torch.Tensor, target_ids: torch.Tensor,
                 offsets: torch.Tensor, sample_ids: list[str]):
        self.ref = ref
        self.x, self.h, self.target_ids, self.offsets = x, h, target_ids, offsets
        self.sample_ids = sample_ids
        self.nbytes = sum(t.numel() * t.element_size() for t in (x, h, target_ids, offsets))
        LIVE_CHUNKS.add(self.nbytes)
        weakref.finalize(self, LIVE_CHUNKS.remove, self.nbytes)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def span(self, i: int) -> tuple[int, int]:
        return int(self.offsets[i]), int(self.offsets[i + 1])


@dataclass
class ChunkRef:
    """A chunk file on disk and what the index says it holds."""

    path: Path
    sample_ids: list[str]
    num_positions: int

    def load(self, draft_layer: int, target_layer: int) -> Chunk:
        """Read only the two needed layers (plus ids and offsets) of this chunk."""
        with safe_open(str(self.path), framework="pt") as f:
            names = set(f.keys())
            want = (layer_key("eventgpt", draft_layer), layer_key("videollava", target_layer))
            for name in want:
                if name not in names:
                    layers = sorted(n for n in names if "." in n)
                    raise KeyError(f"{self.path}: no tensor {name!r} (stored: {layers}); extract that layer "
                                   "with --layers or pick a stored one")
            x, h = f.get_tensor(want[0]), f.get_tensor(want[1])
            ids, offsets = f.get_tensor("target_ids"), f.get_tensor("offsets")
            meta_ids = json.loads((f.metadata() or {}).get("sample_ids", "[]"))
        if meta_ids and meta_ids != self.sample_ids:
            raise ValueError(f"{self.path}: sample ids differ from the index; the folder is inconsistent")
        return Chunk(self, x, h, ids, offsets, list(self.sample_ids))


@dataclass
class HiddenStore:
    """All chunks of an extraction folder (or of its shards), read lazily one chunk at a time."""

    root: Path
    indexes: list[dict[str, Any]]
    chunks: list[ChunkRef] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> HiddenStore:
        root = Path(path)
        files = find_index_files(root)
        if not files:
            raise FileNotFoundError(f"{root}: no index.json (nor shard folders with one); run "
                                    "python -m feature_alignment.extract_hidden_states --output_dir "
                                    f"{root} first")
        indexes, chunks = [], []
        for f in files:
            index = load_index(f.parent)
            indexes.append(index)
            for c in index["chunks"]:
                chunks.append(ChunkRef(f.parent / c["file"], list(c["sample_ids"]), int(c["num_positions"])))
        store = cls(root, indexes, chunks)
        store._check_consistent()
        return store

    def _check_consistent(self) -> None:
        keys = ("eventgpt_path", "videollava_path", "layers", "draft_hidden_size", "target_hidden_size")
        first = self.indexes[0]["config"]
        for other in self.indexes[1:]:
            for k in keys:
                if other["config"].get(k) != first.get(k):
                    raise ValueError(f"{self.root}: shards disagree on {k!r}; they come from different runs")

    @property
    def config(self) -> dict[str, Any]:
        return self.indexes[0]["config"]

    @property
    def complete(self) -> bool:
        """Every shard present and finished."""
        return all(i.get("complete") for i in self.indexes) and not missing_shards(self.indexes)

    @property
    def num_samples(self) -> int:
        return sum(len(c.sample_ids) for c in self.chunks)

    @property
    def num_positions(self) -> int:
        return sum(c.num_positions for c in self.chunks)

    def sample_ids(self) -> list[str]:
        return [s for c in self.chunks for s in c.sample_ids]

    def lm_head_path(self) -> Path | None:
        """The saved target LM head: at the root, else beside the first index."""
        for folder in (self.root, self.root.parent, *(Path(c.path).parent for c in self.chunks[:1])):
            if (folder / LM_HEAD_FILE).is_file():
                return folder / LM_HEAD_FILE
        return None

    def iter_chunks(self, draft_layer: int, target_layer: int, order: Sequence[int] | None = None,
                    ) -> Iterator[Chunk]:
        """Yield chunks one at a time (``order`` = chunk indices); the previous one is released first."""
        for k in (range(len(self.chunks)) if order is None else order):
            chunk = self.chunks[k].load(draft_layer, target_layer)
            yield chunk
            del chunk  # the consumer drops its reference before the next load
