"""curves.py — draw a run's metrics.jsonl as curves in one PNG (needs matplotlib: pip install matplotlib).

    python curves.py runs/grpo                                  # → runs/grpo/curves.png
    python curves.py runs/grpo --keys reward,eval/reward,kl,loss --out grpo.png
    python curves.py runs/sft runs/sft-lr1e-4 --keys loss,eval/accuracy   # runs side by side

One panel per metric, x = step; several runs share the panels, labelled by their directory. Default
keys: the ones each script watches most (reward, eval/reward, kl, loss, eval/accuracy, eval/kl) that
the runs logged.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

WATCHED = ("reward", "eval/reward", "kl", "loss", "eval/accuracy", "eval/kl", "rewards/accuracies")


def read_metrics(run_dir) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl (or of that file itself); a bad line stops with its number."""
    path = pathlib.Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        sys.exit(f"error: {path}: no such file (a run directory holds metrics.jsonl)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path}:{number}: bad JSON ({e.msg})")
    return records


def draw(runs: dict[str, list[dict]], keys: list[str], out) -> None:
    """One panel per key, each run a line of (step, value) where it logged the key."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    cols = min(len(keys), 2)
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--keys", default="", help="comma-separated metric names (default: the watched ones logged)")
    parser.add_argument("--out", default="", help="PNG to write (default: <first run>/curves.png)")
    args = parser.parse_args(argv)
    runs = {str(r): read_metrics(r) for r in args.runs}
    logged = {k for records in runs.values() for r in records for k in r}
    keys = [k for k in args.keys.split(",") if k] or [k for k in WATCHED if k in logged]
    missing = [k for k in keys if k not in logged]
    if missing or not keys:
        sys.exit(f"error: no run logged {', '.join(missing) or 'any of ' + ', '.join(WATCHED)}")
    first = pathlib.Path(args.runs[0])
    out = args.out or str((first if first.is_dir() else first.parent) / "curves.png")
    try:
        draw(runs, keys, out)
    except ImportError:
        sys.exit("error: curves.py needs matplotlib: pip install matplotlib")
    print(f"wrote {out} ({', '.join(keys)})", file=sys.stderr)


if __name__ == "__main__":
    main()
