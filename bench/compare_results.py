"""Are two runs' outputs the same, byte for byte? For refactors that must not move a number.

    python bench/compare_results.py BEFORE/results AFTER/results [--ignore GLOB ...]

Walks both folders and compares every file's bytes: tables (Parquet, with their provenance),
plans and probe files (JSON, safetensors), model weights, report tables and figures. Prints one
line per difference (missing on either side, or different bytes, with the first differing
Parquet column where there is one) and exits 1 if there is any; 0 and a count otherwise.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path


def files_under(root: Path, ignore: list[str]) -> set[str]:
    """Relative paths of every file below `root`, less hidden temporaries and `ignore` globs."""
    found = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if (
            path.is_file()
            and not path.name.startswith(".")
            and not any(fnmatch.fnmatch(rel, pattern) for pattern in ignore)
        ):
            found.add(rel)
    return found


def parquet_difference(a: Path, b: Path) -> str:
    """Where two Parquet files part: the schema metadata, a column, or the row order."""
    import pandas as pd
    import pyarrow.parquet as pq

    if pq.read_schema(a).metadata != pq.read_schema(b).metadata:
        return "schema metadata (provenance) differs"
    left, right = pd.read_parquet(a), pd.read_parquet(b)
    if list(left.columns) != list(right.columns):
        return f"columns {list(left.columns)} vs {list(right.columns)}"
    for column in left.columns:
        if not left[column].equals(right[column]):
            return f"column '{column}' differs"
    return "same values, different encoding"


def compare(before: Path, after: Path, ignore: list[str]) -> list[str]:
    """One line per file that is missing on a side or differs."""
    old, new = files_under(before, ignore), files_under(after, ignore)
    problems = [f"only before: {p}" for p in sorted(old - new)]
    problems += [f"only after: {p}" for p in sorted(new - old)]
    for rel in sorted(old & new):
        a, b = before / rel, after / rel
        if a.read_bytes() != b.read_bytes():
            why = parquet_difference(a, b) if rel.endswith(".parquet") else "bytes differ"
            problems.append(f"differs: {rel} ({why})")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--ignore", action="append", default=[], help="glob of paths to skip")
    args = parser.parse_args()
    problems = compare(args.before, args.after, args.ignore)
    for line in problems:
        print(line)
    count = len(files_under(args.before, args.ignore))
    print(f"{count} files compared, {len(problems)} difference(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
