"""What every workflow script shares: its log file."""

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
