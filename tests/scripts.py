"""What the script tests share: running a script as a user does, and killing it mid-run."""
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def kill_at_checkpoint(script: str, args, out, step: int, poll: float = 0.02) -> int:
    """Start `python script *args --out out` on one CPU device and kill -9 it once the train state of
    `step` appears (no cleanup, maybe mid-save). Returns its exit status (-SIGKILL when killed)."""
    out = pathlib.Path(out)
    proc = subprocess.Popen([sys.executable, script, *args, "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "XLA_FLAGS": ""})
    deadline = time.time() + 300
    while not (out / "checkpoints" / str(step)).is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode
