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


def reset_peak() -> None:
    """Linux: restart this process's peak-RSS count (VmHWM) here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident memory since the last reset_peak, from /proc/self/status."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def last_json(argv, stdin: str | None = None) -> dict:
    """Run a worker process to its end; its last stdout line is its JSON answer (else RuntimeError with
    its last stderr line)."""
    proc = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_by_side(script, nanotune_worker, tunix_script, tunix_config, describe, units: str, footer=None):
    """The driver of bench_dpo.py and bench_distill.py: a fresh process per measurement, systems alternating
    A B A B, each process's step the median of its timed steps (the first compiles), a system's the
    median over its processes; a markdown table with the Tunix / nanotune ratio. nanotune_worker(setting,
    steps) runs in `script --worker=SETTING`; Tunix's tunix_script gets tunix_config(setting) and one
    request {"steps"}; describe(setting) → (row label, units per step: pairs or tokens); footer({setting: {system:
    median step seconds}}) → lines printed under the table."""
    import argparse
    import statistics
    import sys
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--settings", default="tiny,mid")
    parser.add_argument("--systems", default="nanotune,tunix")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one that compiles)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per system and setting")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # setting: run nanotune's step here
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(nanotune_worker(args.worker, args.steps)))
        return
    tunix_python = pathlib.Path(script).resolve().parent / ".tunix-venv" / "bin" / "python"
    systems = [s for s in args.systems.split(",") if s != "tunix" or tunix_python.exists()]
    if len(systems) < len(args.systems.split(",")):
        print("no benchmarks/.tunix-venv: Tunix skipped (RESULTS.md says how to install it)", file=sys.stderr)

    def measure(system, setting):
        if system == "tunix":
            return last_json([tunix_python, tunix_script, json.dumps(tunix_config(setting))],
                             json.dumps({"steps": args.steps + 1}) + "\n")
        return last_json([sys.executable, script, f"--steps={args.steps}", f"--worker={setting}"])
    rows, failed = [], []
    for setting in args.settings.split(","):
        results = {s: [] for s in systems}
        for r in range(args.repeats):
            for system in systems:
                try:
                    out = measure(system, setting)
                except RuntimeError as e:  # the others still run; the exit status says so at the end
                    print(f"{system} {setting}: {e}", file=sys.stderr)
                    failed.append((system, setting))
                    continue
                out["step"] = statistics.median(out["step_s"][1:])
                results[system].append(out)
                print(f"round {r + 1} {system} {setting}: step {out['step'] * 1e3:.1f} ms (first "
                      f"{out['step_s'][0]:.1f}s), peak RSS {out['peak_rss_bytes'] / 2**30:.2f} GiB",
                      file=sys.stderr, flush=True)
        rows.append((setting, results))
    print(f"\n| setting | system | step (ms) | {units}/s | peak RSS (GiB) | Tunix / nanotune |")
    print("| --- | --- | --- | --- | --- | --- |")
    for setting, results in rows:
        if not any(results.values()):  # nothing measured (an unknown setting fails describe too)
            continue
        label, per_step = describe(setting)
        step = {s: statistics.median(x["step"] for x in v) for s, v in results.items() if v}
        for system, runs in results.items():
            if not runs:
                continue
            ratio = f"**{step['tunix'] / step[system]:.2f}x**" if "tunix" in step and system != "tunix" else ""
            rss = statistics.median(x["peak_rss_bytes"] for x in runs) / 2**30
            print(f"| {label} | {system} | {step[system] * 1e3:.1f} | {per_step / step[system]:.3g} | {rss:.2f} | "
                  f"{ratio} |")
    if footer:
        print("\n".join(footer({setting: {s: statistics.median(x["step"] for x in v) for s, v in results.items() if v}
                                for setting, results in rows if any(results.values())})))  # the measured ones
    if failed:  # after the table: a benchmark that broke must not pass for one that ran
        print(f"{len(failed)} measurement(s) failed: {', '.join(f'{s} {x}' for s, x in failed)}", file=sys.stderr)
        sys.exit(1)
