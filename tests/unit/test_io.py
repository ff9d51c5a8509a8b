"""What every workflow script shares: its log file, its writers and their provenance."""

import subprocess
import sys
import textwrap


def test_an_error_that_ends_a_script_is_in_its_log_file(tmp_path):
    log = tmp_path / "logs" / "job.log"
    script = textwrap.dedent(
        f"""
        from securetune.io import setup_logging
        setup_logging({str(log)!r})
        raise RuntimeError("the cause, for the user")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    text = log.read_text()
    assert "RuntimeError: the cause, for the user" in text and "Traceback" in text
    assert "RuntimeError: the cause, for the user" in result.stderr


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """Two processes, same tensors and metadata: the same bytes (metadata order is fixed)."""
    script = textwrap.dedent(
        """
        import sys, torch
        from securetune.io import write_safetensors
        meta = {f"key{i}": str(i) for i in range(12)}
        write_safetensors({"a": torch.arange(6.0), "b": torch.ones(2, 3)}, sys.argv[1], meta)
        """
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in files:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({path.read_bytes() for path in files}) == 1
    from safetensors import safe_open

    with safe_open(files[0], "pt") as f:
        assert f.metadata()["key11"] == "11"
        assert f.get_tensor("a").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def _model_folder(path, revision):
    import json

    path.mkdir()
    (path / "securetune_model.json").write_text(json.dumps({"revision": revision}))
    return path


def test_every_table_records_seed_versions_and_model_revision(tmp_path):
    import pandas as pd
    import pytest

    from securetune.io import provenance, read_provenance, write_parquet

    model = _model_folder(tmp_path / "model", "abc123")
    path = tmp_path / "table.parquet"
    write_parquet(pd.DataFrame({"x": [1, 2]}), path, provenance(7, model))
    record = read_provenance(path)
    assert record["seed"] == 7 and record["model_revision"] == "abc123"
    assert {"torch", "transformers", "python"} <= set(record["versions"])
    assert pd.read_parquet(path)["x"].tolist() == [1, 2]
    write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "data.parquet", provenance(7))
    assert read_provenance(tmp_path / "data.parquet")["model_revision"] is None
    with pytest.raises(ValueError, match="lacks"):
        write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "bad.parquet", {"seed": 1})
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match="records no provenance"):
        read_provenance(tmp_path / "foreign.parquet")


def test_tables_from_other_models_are_not_combined_silently(tmp_path):
    import pandas as pd
    import pytest

    from securetune.io import common_provenance, provenance, write_parquet

    parts = []
    for i, revision in enumerate(["r1", "r1", "r2"]):
        model = _model_folder(tmp_path / f"m{i}", revision)
        parts.append(tmp_path / f"part{i}.parquet")
        write_parquet(pd.DataFrame({"x": [i]}), parts[-1], provenance(0, model))
    assert common_provenance(parts[:2])["model_revision"] == "r1"
    with pytest.raises(ValueError, match="part2.parquet"):
        common_provenance(parts)


def test_versions_are_the_libraries_own_and_read_without_importing_them():
    """Every job writing a table records versions: importing torch and vLLM for that would cost
    each job seconds, so they come from the installed distributions' metadata; and the table-only
    stages (dozens of jobs per run) and what the workflow reads when it is parsed start without
    torch."""
    script = textwrap.dedent(
        """
        import json, sys
        import securetune.checks, securetune.jobs, securetune.method, securetune.settings
        import securetune.data, securetune.scoring, securetune.robustness_table
        import securetune.report, securetune.report.settings
        from securetune.io import versions
        record = versions()
        print(json.dumps({"record": record, "imported": sorted(
            name for name in ("torch", "transformers", "vllm", "peft", "sklearn")
            if name in sys.modules)}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    import json

    import torch
    import transformers

    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["imported"] == []
    assert out["record"]["torch"] == torch.__version__
    assert out["record"]["transformers"] == transformers.__version__
