"""Time per decode step by configuration, as a chart: from a decode_throughput.py result file.

    .venv/bin/python bench/plot_steps.py [bench/results/decode_throughput-default-....json]

Default: the newest decode_throughput-*.json under bench/results/. Writes a PNG next to it when
matplotlib is installed, and always a text bar chart (.plot.txt): one bar per configuration and
batch size, ms per step (= ms per output token of one sequence), with the memory-bandwidth floor
and transformers' figure of that batch size marked.
"""

import argparse
import json
import pathlib
import sys

import harness

WIDTH = 60  # characters of the longest bar


def text_chart(data: dict) -> str:
    rows, floors = data["rows"], data["floors"]
    lines = []
    for batch in sorted({row["batch"] for row in rows}):
        chosen = [row for row in rows if row["batch"] == batch]
        floor_ms = floors[str(batch)]["floor_s"] * 1e3
        longest = max(max(row["tpot_ms"] for row in chosen), floor_ms)
        label_width = max(len(row["config"]) for row in chosen)
        lines.append(f"batch {batch}: ms per decode step (| = memory-bandwidth floor, {floor_ms:.1f} ms)")
        for row in chosen:
            bar = ["#"] * max(1, round(row["tpot_ms"] / longest * WIDTH)) + [" "] * WIDTH
            floor_at = min(WIDTH, round(floor_ms / longest * WIDTH))
            bar[floor_at] = "|" if bar[floor_at] == " " else "+"
            lines.append(f"  {row['config']:<{label_width}}  {''.join(bar[:WIDTH + 1])}  {row['tpot_ms']:7.1f} ms"
                         f"  {row['vs_transformers']:.2f}x transformers tok/s")
        lines.append("")
    return "\n".join(lines)


def png_chart(data: dict, path: pathlib.Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    batches = sorted({row["batch"] for row in data["rows"]})
    figure, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        chosen = [row for row in data["rows"] if row["batch"] == batch]
        axis.barh([row["config"] for row in chosen], [row["tpot_ms"] for row in chosen])
        axis.axvline(data["floors"][str(batch)]["floor_s"] * 1e3, color="red", linestyle="--", label="floor")
        axis.set_title(f"batch {batch}")
        axis.set_xlabel("ms per decode step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", nargs="?", type=pathlib.Path, help="a decode_throughput-*.json")
    args = parser.parse_args(argv)
    result = args.result or max(harness.RESULTS_DIR.glob("decode_throughput-*.json"), key=lambda p: p.stat().st_mtime)
    data = json.loads(result.read_text())
    text = text_chart(data)
    print(text)
    out = result.with_suffix(".plot.txt")
    out.write_text(text + "\n")
    print(f"written to {out}")
    if png_chart(data, result.with_suffix(".png")):
        print(f"and {result.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
