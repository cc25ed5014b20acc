"""Plot a training run: loss and acceptance estimate over steps (train and eval), per-slot accuracy at the end.

    python -m tools.plot_run RUN_DIR [--out RUN_DIR/curves.png]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run_dir: Path) -> list[dict]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)  # a resumed run re-logs steps: the last row wins
    return [rows[s] for s in sorted(rows)]


def plot(run_dir: Path, out: Path) -> Path:
    rows = load(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acceptance_estimate", "acceptance estimate")):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            pts = [(r["step"], r[prefix + key]) for r in rows if prefix + key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=prefix.rstrip("/") or "train")
        ax.set(title=title, xlabel="step")
        ax.legend()
    last = next((r for r in reversed(rows) if any(k.startswith("acc_") for k in r)), {})
    slots = sorted((int(k[4:]), v) for k, v in last.items() if k.startswith("acc_"))
    if slots:
        axes[2].bar(*zip(*slots))
    axes[2].set(title=f"per-slot accuracy (step {last.get('step', '?')})", xlabel="block slot k", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(plot(args.run_dir, args.out or args.run_dir / "curves.png"))


if __name__ == "__main__":
    main()
