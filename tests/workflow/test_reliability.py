"""Bad input fails early with a message naming the problem; faults lose nothing; runs reproduce.

Each case is recorded, and the reliability table of docs/reliability.md is generated from these
records: `SECURETUNE_UPDATE_README=1 pytest tests/workflow/test_reliability.py` rewrites it, and
the last test fails if the table is stale.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .helpers import REPO, copy_workflow, merged, snakemake

RECORDS: list[tuple[str, str, str]] = []  # (kind, case, what happened)
SMALL = {
    "model": {"tiny": {"layers": 2}},
    "data": {"probe_per_class": 16},
    "domains": {"general": {"ift_examples": 16}},
    "robustness": {"module_types": ["q", "v", "down"], "seeds": 1},
    "search": {"max_modules": 3, "seeds": 1},
    "finetune": {"steps": 4},
    "evaluation": {"benchmarks": {"advbench": 4, "xstest_safe": 4}},
    "generation": {"max_new_tokens": 8},
}
REPRODUCED = [
    "results/probe/accuracy.parquet",
    "results/probe/probes.safetensors",
    "results/robustness.parquet",
    "results/search/plan.json",
    "results/search/trace.parquet",
    "results/general/finetune/vanilla/loss.parquet",
    "results/general/finetune/ml_lr/model/model.safetensors",
    "results/general/scores/ml_lr/advbench.parquet",
    "results/general/generations/vanilla/xstest_safe.parquet",
]


def one_domain(config: dict) -> dict:
    """The tiny config with its general domain only: these runs test faults, not domains."""
    return {**config, "domains": {"general": config["domains"]["general"]}}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("reliability") / "clean", tiny_default=True)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    (workdir / "config.yaml").write_text(yaml.safe_dump(one_domain(config), sort_keys=False))
    return workdir


def _fresh(workflow: Path, tmp_path: Path) -> Path:
    """A private copy of the workflow (cheap: the repo is small)."""
    return shutil.copytree(workflow, tmp_path / "wf", symlinks=True)


def _error_line(output: str, pattern: str) -> str:
    for line in output.splitlines():
        if re.search(pattern, line):
            return line.strip().lstrip("- ")
    raise AssertionError(f"no line matching {pattern!r} in:\n{output[-3000:]}")


def _expect_failure(workdir: Path, pattern: str, *args: str) -> str:
    result = snakemake(workdir, *args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "Job stats" not in result.stdout or "-n" not in args
    return _error_line(output, pattern)


def _overlay(workdir: Path, overlay: dict, name: str = "case.yaml") -> str:
    (workdir / name).write_text(yaml.safe_dump(overlay))
    return name


CONFIG_CASES = [
    (
        "unknown key finetune.learning_rate",
        {"finetune": {"learning_rate": 0.1}},
        r"unknown config key",
    ),
    ("wrong type finetune.steps: 'ten'", {"finetune": {"steps": "ten"}}, r"finetune\.steps"),
    ("gamma < 0", {"finetune": {"arms": {"ml_lr": {"kind": "ml_lr", "gamma": -0.5}}}}, r"gamma"),
    ("tau outside [0, 1]", {"search": {"tau": 1.5}}, r"search\.tau"),
    ("module type the architecture lacks (qkv)", {"robustness": {"module_types": ["qkv"]}}, r"qkv"),
    ("layer index past the model's depth", {"probe": {"proxy_layers": [0, 9]}}, r"proxy_layers"),
    ("ml_lr arm without gamma", {"finetune": {"arms": {"x": {"kind": "ml_lr"}}}}, r"gamma"),
]


@pytest.mark.parametrize(
    ("case", "overlay", "pattern"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config_stops_before_any_job(workflow, case, overlay, pattern):
    line = _expect_failure(workflow, pattern, "-n", "--configfile", _overlay(workflow, overlay))
    RECORDS.append(("config", case, line))


def _corrupt(path: Path, how: str) -> None:
    if how == "missing column":
        path.write_text(path.read_text().replace("prompt,", "text,", 1))
    elif how == "empty file":
        path.write_text("")
    elif how == "non-UTF-8 bytes":
        lines = path.read_bytes().splitlines(keepends=True)
        lines[41] = lines[41][:-2] + b"\xff\xfe\n"
        path.write_bytes(b"".join(lines))
    elif how == "duplicate prompt ids":
        lines = path.read_text().splitlines(keepends=True)
        first = lines[1].split(",", 1)[0]
        lines[2] = first + "," + lines[2].split(",", 1)[1]
        path.write_text("".join(lines))


DATA_CASES = [
    ("missing column", "xstest_prompts.csv", r"missing column"),
    ("empty file", "advbench_harmful_behaviors.csv", r"is empty"),
    ("non-UTF-8 bytes", "strongreject_dataset.csv", r"not valid UTF-8"),
    ("duplicate prompt ids", "xstest_prompts.csv", r"duplicate prompt id"),
]


@pytest.mark.parametrize(("how", "name", "pattern"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_broken_data_file_stops_before_any_job(workflow, tmp_path, how, name, pattern):
    workdir = _fresh(workflow, tmp_path)
    _corrupt(workdir / "resources" / "data" / name, how)
    line = _expect_failure(workdir, pattern, "-n")
    assert name in line
    RECORDS.append(("data", f"{how} ({name})", line))


def test_prompt_longer_than_limit_is_named_before_features(workflow, tmp_path):
    workdir = _fresh(workflow, tmp_path)
    name = _overlay(workdir, {**SMALL, "data": {**SMALL["data"], "max_prompt_tokens": 24}})
    line = _expect_failure(
        workdir,
        r"more than data\.max_prompt_tokens",
        "results/features/features.safetensors",
        "--configfile",
        name,
    )
    assert re.search(r"row \d+ \(prompt id '[\w:]+'\)", line)
    assert not (workdir / "results" / "features").exists()
    RECORDS.append(("data", "prompt longer than data.max_prompt_tokens", line))


def _model_folder(workdir: Path, how: str) -> Path:
    folder = workdir / "my model"
    snakemake(workdir, "results/model/base", "--configfile", _overlay(workdir, SMALL, "small.yaml"))
    shutil.copytree(workdir / "results" / "model" / "base", folder)
    config = json.loads((folder / "config.json").read_text())
    if how == "missing weights":
        (folder / "model.safetensors").unlink()
    elif how == "architecture without a module mapping (gpt2)":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif how == "tokenizer without a chat template":
        (folder / "chat_template.jinja").unlink()
    elif how == "model that ships its own code":
        (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"x": "y.Z"}}))
    return folder


MODEL_CASES = [
    ("missing weights", r"no \*\.safetensors"),
    ("architecture without a module mapping (gpt2)", r"fuses its attention"),
    ("tokenizer without a chat template", r"no chat template"),
    ("model that ships its own code", r"trust_remote_code"),
]


@pytest.mark.parametrize(("how", "pattern"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder_stops_before_any_job(workflow, tmp_path, how, pattern):
    workdir = _fresh(workflow, tmp_path)
    folder = _model_folder(workdir, how)
    name = _overlay(workdir, {**SMALL, "model": {"source": str(folder)}})
    line = _expect_failure(workdir, pattern, "-n", "--configfile", name)
    RECORDS.append(("model", how, line))


def test_shell_metacharacters_in_paths_run_nothing_and_secrets_stay_out(workflow, tmp_path):
    workdir = shutil.copytree(workflow, tmp_path / "we ird; touch PWNED $(touch PWNED2) `x`")
    name = _overlay(workdir, SMALL)
    env = {**os.environ, "HF_TOKEN": "hf_SENTINEL_never_log_me"}
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        "--cores",
        "2",
        "results/general/finetune/ml_lr/loss.parquet",
        "--configfile",
        name,
    ]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    for path in workdir.rglob("*"):
        if path.is_file() and path.suffix in {".log", ".json", ".txt", ".tsv", ""}:
            assert "SENTINEL" not in path.read_text(errors="ignore"), path
    assert "SENTINEL" not in result.stdout + result.stderr
    RECORDS.append(
        (
            "untrusted",
            "paths with spaces, ;, $( ) and backticks; HF_TOKEN set",
            "finetune ran; no injected command ran; the token is in no log or output",
        )
    )


def _kill_during_robustness(workdir: Path, name: str) -> None:
    """Start the run and SIGKILL Snakemake and its jobs once robustness outputs appear."""
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--cores", "2", "--configfile", name]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if list((workdir / "results" / "robustness").glob("layer*/*.parquet")):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _planned_outputs(plan: str) -> set[str]:
    """Output paths of every job of a dry run."""
    outputs = set()
    for line in plan.splitlines():
        if line.strip().startswith("output:"):
            outputs |= {p.strip() for p in line.split(":", 1)[1].split(",")}
    return outputs


# Smaller than SMALL, as a full config (two arms, no guard judge): two whole runs fit in minutes.
KILLED = {
    **SMALL,
    "finetune": {
        "steps": 4,
        "arms": {"vanilla": {"kind": "vanilla"}, "ml_lr": {"kind": "ml_lr", "gamma": 0.1}},
    },
    "evaluation": {**SMALL["evaluation"], "guard": {"enabled": False}},
}


def test_killed_run_resumes_and_reproduces_a_clean_run_byte_for_byte(workflow, tmp_path):
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config = one_domain(merged(tiny, KILLED))
    config["finetune"]["arms"] = KILLED["finetune"]["arms"]
    clean = _fresh(workflow, tmp_path / "a")
    snakemake(clean, "--configfile", _overlay(clean, config))
    killed = _fresh(workflow, tmp_path / "b")
    name = _overlay(killed, config)
    _kill_during_robustness(killed, name)
    # A SIGKILLed Snakemake cannot release its lock; the user removes it, as Snakemake says.
    locked = snakemake(killed, "--configfile", name, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(killed, "--unlock", "--configfile", name)
    # What the rerun plans is what was missing or unfinished; everything else must stay as is.
    redo = _planned_outputs(snakemake(killed, "-n", "--configfile", name).stdout)
    finished = {
        p: p.stat().st_mtime_ns
        for p in (killed / "results").rglob("*")
        if p.is_file() and not any(str(p.relative_to(killed)).startswith(o) for o in redo)
    }
    assert finished, "the kill came before any finished output"
    snakemake(killed, "--configfile", name)
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    for rel in REPRODUCED:
        assert (clean / rel).read_bytes() == (killed / rel).read_bytes(), rel
    RECORDS.append(
        (
            "fault",
            "Snakemake and its jobs SIGKILLed during the robustness stage",
            "after `snakemake --unlock`, the rerun finished only what was missing or unfinished; "
            "every output byte-identical to an uninterrupted run",
        )
    )
    RECORDS.append(
        (
            "reproducible",
            "same config and seed, two runs on this CPU",
            f"byte-identical: {', '.join(Path(r).name for r in REPRODUCED)}",
        )
    )


def _table() -> str:
    rows = ["| kind | input or fault | what happened |", "|---|---|---|"]
    for kind, case, what in RECORDS:
        what = re.sub(r"/tmp/\S+?/(wf|clean)/", "", what).replace("|", "\\|")
        rows.append(f"| {kind} | {case} | {what} |")
    return "\n".join(rows)


def test_reliability_table_is_generated_from_these_tests():
    readme = REPO / "docs" / "reliability.md"
    text = readme.read_text()
    start, end = "<!-- reliability:start -->", "<!-- reliability:end -->"
    assert start in text and end in text
    table = _table()
    current = text.split(start)[1].split(end)[0].strip()
    if os.environ.get("SECURETUNE_UPDATE_README"):
        readme.write_text(
            text.split(start)[0] + start + "\n" + table + "\n" + end + text.split(end)[1]
        )
    elif current and len(RECORDS) >= len(CONFIG_CASES) + len(DATA_CASES) + len(MODEL_CASES) + 3:
        # Checked once the page holds a generated table (not yet: see the issue note).
        assert current == table, (
            "docs/reliability.md table is stale: rerun with SECURETUNE_UPDATE_README=1"
        )
