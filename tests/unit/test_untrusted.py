"""Nothing the workflow loads can execute code: no eval/exec, no pickle, no remote code."""

import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from securetune.checks import check_model_source
from securetune.io import atomic_path
from securetune.model_sources import ModelFolderError, check_model_folder

from ..conftest import REPO

FORBIDDEN = {
    r"(?<![\w.])eval\(": "eval of data",
    r"(?<![\w.])exec\(": "exec of data",
    r"pickle\.loads?\(": "unpickling",
    r"trust_remote_code\s*=\s*True": "remote code switched on in code",
    r"torch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only",
}


@pytest.mark.parametrize("pattern", FORBIDDEN)
def test_package_never_executes_what_it_loads(pattern):
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("src", "workflow_scripts")
        for path in (REPO / folder).rglob("*.py")
        if re.search(pattern, path.read_text())
    ]
    assert not offenders, f"{FORBIDDEN[pattern]} in {offenders}"


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_remote_code_folder_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="trust_remote_code"):
        check_model_folder(folder)
    assert check_model_folder(folder, trust_remote_code=True)["model_type"] == "llama"


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"no \*\.safetensors weights .*allow_pickle"):
        check_model_folder(folder)
    check_model_folder(folder, allow_pickle=True)


def test_missing_chat_template_and_unmapped_architecture(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelFolderError, match="no chat template"):
        check_model_folder(folder)
    folder = _copy_model(tiny_model_dir, tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelFolderError, match="fuses its attention"):
        check_model_folder(folder)


def test_missing_model_folder_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="'model.source': folder '.*nope' does not exist"):
        check_model_source(str(tmp_path / "nope"), False, False)


def test_killed_writer_leaves_no_complete_looking_file(tmp_path):
    target = tmp_path / "table.parquet"
    script = textwrap.dedent(f"""
        import os, signal, time
        from securetune.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half a table")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -signal.SIGKILL
    assert not target.exists()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"


def test_failed_block_leaves_previous_output_intact(tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("new but broken")
        raise RuntimeError("job failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
