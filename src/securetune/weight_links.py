"""The source model's weights referenced, not copied: `results/model/base` holds symlinks.

For a local folder or a hub snapshot (`model.link_weights: true`), `build_base_model` copies the
small files (config, tokenizer, chat template) and symlinks each weight file to the resolved
source file (the cache blob, for a hub snapshot), so a 7B model costs no second 13.5 GB. The
files are not ours: they can change or vanish after the run starts. A manifest in the folder
records each linked file's target, size, mtime and sha256 at build time, and every stage checks
size and mtime before it loads the weights (a stat per file, not a re-hash).

Torch-free: the vLLM path and the header readers import it without loading a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from securetune.io import sha256_of_each
from securetune.model_sources import ModelFolderError, check_model_folder

log = logging.getLogger(__name__)

LINKS_FILE = "securetune_links.json"
SAFETENSORS_FILES = (".safetensors", ".safetensors.index.json")
PICKLE_FILES = (".bin", ".bin.index.json")
# Weight formats no stage reads: left out of a linked folder rather than copied at full size.
UNREAD_WEIGHT_FILES = (".pth", ".pt", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
REBUILD = "rebuild with `snakemake --forcerun build_base_model` or restore it"


class LinkedWeightsChanged(ModelFolderError):
    """A weight file a model folder links to is not what it was when the folder was built."""


def weight_files(folder: Path) -> list[Path]:
    """The files a model revision hashes, in its order: safetensors shards, then pickle ones."""
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def linked_suffixes(allow_pickle: bool) -> tuple[str, ...]:
    """The files of a source folder a stage may load as weights: these are linked."""
    return SAFETENSORS_FILES + (PICKLE_FILES if allow_pickle else ())


def link_model_folder(
    src: Path, out_dir: Path, allow_pickle: bool = False, trust_remote_code: bool = False
) -> str:
    """Check `src` as `check_model_folder` does; fill `out_dir` with copies of its small files and
    symlinks to its weights; record the manifest. Returns the weights' revision (as
    `models.weights_revision` computes it), hashed in the same read as the manifest's sha256s."""
    check_model_folder(src, allow_pickle, trust_remote_code)
    linked = linked_suffixes(allow_pickle)
    left_out = []
    for entry in sorted(src.iterdir()):
        if entry.is_dir():
            left_out.append(entry.name)
        elif entry.name.endswith(linked):
            (out_dir / entry.name).symlink_to(entry.resolve(strict=True))
        elif entry.name.endswith(PICKLE_FILES + UNREAD_WEIGHT_FILES):
            left_out.append(entry.name)
        else:
            shutil.copy2(entry, out_dir / entry.name)
    if left_out:
        log.info("not carried from %s (no stage reads them): %s", src, ", ".join(left_out))
    return _write_manifest(out_dir)


def _write_manifest(folder: Path) -> str:
    """Hash each linked file (each symlink of `folder`) once and record what it is now; returns
    the weights' revision.

    Size and mtime are taken before and after the read: a file rewritten while it is hashed
    would otherwise be recorded with a hash of neither version."""
    weights = weight_files(folder)
    indexes = sorted(p for p in folder.iterdir() if p.is_symlink() and p not in weights)
    links = weights + indexes
    targets = [Path(os.readlink(p)) for p in links]
    before = [_stamp(t) for t in targets]
    revision, weight_hashes = sha256_of_each(*weights, with_names=True)
    _, index_hashes = sha256_of_each(*indexes)
    files = []
    for link, target, (size, mtime_ns), sha256 in zip(
        links, targets, before, weight_hashes + index_hashes, strict=True
    ):
        if _stamp(target) != (size, mtime_ns):
            raise ModelFolderError(f"model.source file {target} changed while it was hashed")
        files.append(
            {
                "name": link.name,
                "target": str(target),
                "size": size,
                "mtime_ns": mtime_ns,
                "sha256": sha256,
            }
        )
    (folder / LINKS_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n")
    log.info("linked %d weight file(s), %.2f GB, not copied", len(files), _gigabytes(files))
    return revision


def check_linked_weights(folder: str | Path) -> None:
    """Refuse a model folder whose linked weights changed or vanished since it was built: loading
    them would compute with other weights than every recorded revision says. A folder without
    links (built, converted, copied, trained) passes at once."""
    folder = Path(folder)
    manifest = folder / LINKS_FILE
    if not manifest.exists():
        return
    for entry in json.loads(manifest.read_text())["files"]:
        change = _change_of(folder, entry)
        if change is not None:
            what, detail = change
            raise LinkedWeightsChanged(
                f"model.source file {entry['target']} {what} since {folder} was built"
                f"{f' ({detail})' if detail else ''}; {REBUILD}"
            )


def _change_of(folder: Path, entry: dict) -> tuple[str, str] | None:
    """What happened to one linked file, in words (what, detail); None if it is as recorded."""
    link = folder / entry["name"]
    if not link.is_symlink() or os.readlink(link) != entry["target"]:
        return f"is no longer what {link} links to", ""
    try:
        size, mtime_ns = _stamp(Path(entry["target"]))
    except FileNotFoundError:
        return "vanished", ""
    if size != entry["size"]:
        return "changed", f"size {entry['size']} -> {size}"
    if mtime_ns != entry["mtime_ns"]:
        return "changed", f"modified {_when(entry['mtime_ns'])} -> {_when(mtime_ns)}"
    return None


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _when(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat(timespec="microseconds")


def _gigabytes(files: list[dict]) -> float:
    return sum(f["size"] for f in files) / 1e9
