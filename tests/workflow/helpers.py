"""Run the workflow from a copy of the repo, as a user would from a clone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_FILES = [
    "Snakefile",
    "config.yaml",
    "rules",
    "workflow_scripts",
    "schemas",
    "configs",
    "resources",
    "profiles",
    "envs",
    "src",
    "report",
]


def copy_workflow(dest: Path, tiny_default: bool = False) -> Path:
    """A copy of the repo's workflow; with `tiny_default`, configs/tiny.yaml is its config.yaml,
    so partial overlays (a test's one changed key) extend the tiny scale, not the demo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    if tiny_default:
        shutil.copy2(REPO / "configs" / "tiny.yaml", dest / "config.yaml")
    return dest


def merged(base: dict, overlay: dict) -> dict:
    """Snakemake's key-by-key merge of an overlay into a config (a new dict)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake from the venv in `workdir`; on failure, show its output."""
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--cores", "2", *args]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run as {rule: count}."""
    counts = {}
    table = output.split("Job stats:")[-1]
    for line in table.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def planned_priorities(output: str) -> dict[tuple[str, str], int]:
    """{(rule, wildcards): priority} of every job a dry run would run (0 where none shown)."""
    out = {}
    for block in re.split(r"^(?:local)?rule ", output, flags=re.M)[1:]:
        rule = block.split(":", 1)[0]
        wildcards = re.search(r"^\s+wildcards: (.+)$", block, re.M)
        priority = re.search(r"^\s+priority: (\d+)$", block, re.M)
        key = (rule, wildcards.group(1) if wildcards else "")
        out[key] = int(priority.group(1)) if priority else 0
    return out


def planned_wildcards(output: str) -> list[str]:
    """The `wildcards:` line of every job a dry run would run."""
    return re.findall(r"^\s+wildcards: (.+)$", output, re.M)
