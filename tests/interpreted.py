"""Running a test module again in a child process with ``TRITON_INTERPRET=1`` set from the
start (Triton chooses interpreter or compiler once, when it is first imported)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_under_interpreter(test_file: str, *pytest_args: str, timeout: int) -> tuple[int, str]:
    """(return code, the tail of stdout and stderr) of pytest on ``test_file`` in the child."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-x", "-rs",
         "-p", "no:cacheprovider", *pytest_args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return result.returncode, result.stdout[-6000:] + result.stderr[-2000:]
