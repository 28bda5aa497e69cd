"""One benchmarked system in its own process (its own virtual environment if need be): it reads a
JSON request per line on stdin and answers a JSON line on stdout, so a driver can alternate systems
step by step on one machine and compare them in one run."""
import json
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, name, argv):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def __call__(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
