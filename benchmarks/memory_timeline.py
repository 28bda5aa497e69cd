"""The resident memory of a whole run over time, phase by phase: where a script's process peaks.

    python benchmarks/memory_timeline.py sft.py --ckpt ~/gemma-3-270m --data train.jsonl --batch-size 4 --steps 3
    python benchmarks/memory_timeline.py --json timeline.json --plot timeline.png grpo.py --ckpt ... --steps 3

It imports the script (sft, lora, dpo, grpo or distill), wraps the functions that start each phase
(run.load, the warm-up, evaluation, run.save, the exports) so that a sample knows the phase it fell in,
and runs the script's main() with the arguments that follow it, while a thread reads this process's
resident set size (/proc/self/statm) every --interval seconds. It prints the peak of each phase and of
the whole run; "train" is every moment outside the named phases (the steps, their compiles, the
rollouts). The library is not changed: the wrapping is this file's, and only here.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import pathlib
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
SCRIPTS = ("sft", "lora", "dpo", "grpo", "distill")


def rss() -> int:
    """This process's resident set size in bytes, now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Timeline:
    """Samples (seconds, bytes, phase) from a thread; phase() names the phase the samples fall in."""

    def __init__(self, interval: float):
        self.interval, self.samples, self.stack, self.t0 = interval, [], ["outside main()"], time.perf_counter()
        self.done, self.lock = threading.Event(), threading.Lock()  # the lock: samples of both threads in time order
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.done.wait(self.interval):
            self.mark()

    def mark(self):
        with self.lock:
            self.samples.append((time.perf_counter() - self.t0, rss(), self.stack[-1]))

    @contextlib.contextmanager
    def phase(self, name: str):
        self.mark()  # the last moment of the phase before, and the first of this one
        self.stack.append(name)
        self.mark()
        try:
            yield
        finally:
            self.mark()  # (none after: what this phase still holds is not the outer phase's)
            self.stack.pop()

    def wrap(self, module, attribute: str, name: str):
        """module.attribute runs as phase `name` (the outermost named phase wins: an evaluation inside
        the warm-up counts as the warm-up's)."""
        fn = getattr(module, attribute)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.stack[-1] != "train":
                return fn(*args, **kwargs)
            with self.phase(name):
                return fn(*args, **kwargs)
        setattr(module, attribute, wrapped)

    def peaks(self) -> dict[str, tuple[int, float]]:
        """phase → (peak bytes, seconds spent), in the order the phases first ran."""
        out, spent = {}, {}
        for (t, b, p), (t_next, _, _) in zip(self.samples, self.samples[1:] + [self.samples[-1]]):
            out[p] = max(out.get(p, 0), b)
            spent[p] = spent.get(p, 0.0) + (t_next - t)
        return {p: (b, spent[p]) for p, b in out.items()}


def instrument(timeline: Timeline, script) -> None:
    """The phases: loading, the demos' supervised warm-up, evaluation, the train-state save, the export."""
    import run
    for module, attribute, name in [  # (not sample.generate: grpo's rollouts are part of its step)
            (run, "load", "load"), (run, "warm_up", "warm-up"), (run, "train_supervised", "warm-up"),
            (run, "evaluate_completions", "eval"), (script, "evaluate", "eval"),
            (run, "save", "save"), (run, "export_hf", "export"), (run, "export_peft", "export"),
            (run, "export_policy", "export")]:
        if hasattr(module, attribute):
            timeline.wrap(module, attribute, name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between samples")
    parser.add_argument("--json", help="write the samples [[seconds, bytes, phase], ...] here")
    parser.add_argument("--plot", help="draw the timeline in this PNG (needs matplotlib)")
    parser.add_argument("script", help="sft.py, lora.py, dpo.py, grpo.py or distill.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own flags")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if pathlib.Path(args.script).stem not in SCRIPTS:
        sys.exit(f"error: {args.script}: not one of the training scripts ({', '.join(s + '.py' for s in SCRIPTS)})")
    script = importlib.import_module(pathlib.Path(args.script).stem)
    timeline = Timeline(args.interval)
    instrument(timeline, script)
    timeline.thread.start()
    with timeline.phase("train"):
        script.main(args.args)
    timeline.done.set()
    timeline.thread.join()
    peaks = timeline.peaks()
    train_peak = peaks.get("train", (0, 0))[0]
    print(f"\n| phase | peak RSS (GiB) | over the steps' peak (GiB) | seconds |\n| --- | --- | --- | --- |")
    for phase, (peak, seconds) in peaks.items():
        print(f"| {phase} | {peak / 2**30:.2f} | {(peak - train_peak) / 2**30:+.2f} | {seconds:.1f} |")
    whole = max(b for _, b, _ in timeline.samples)
    print(f"| whole run | {whole / 2**30:.2f} | {(whole - train_peak) / 2**30:+.2f} | {timeline.samples[-1][0]:.1f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(timeline.samples))
    if args.plot:
        plot(timeline.samples, args.plot, " ".join([pathlib.Path(args.script).name] + args.args))


def plot(samples, path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot([t for t, _, _ in samples], [b / 2**30 for _, b, _ in samples], color="black", lw=1)
    colors = {"load": "tab:gray", "warm-up": "tab:purple", "eval": "tab:blue", "save": "tab:orange",
              "export": "tab:red"}
    start = 0
    for i in range(1, len(samples) + 1):  # shade each run of samples in one named phase
        if i == len(samples) or samples[i][2] != samples[start][2]:
            phase = samples[start][2]
            if phase in colors:
                ax.axvspan(samples[start][0], samples[i - 1][0], color=colors[phase], alpha=0.25, lw=0)
            start = i
    ax.legend(handles=[matplotlib.patches.Patch(color=c, alpha=0.25, label=p) for p, c in colors.items()],
              loc="lower right", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (GiB)")
    ax.set_title(title[:110], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
