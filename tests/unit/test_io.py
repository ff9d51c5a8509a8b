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
