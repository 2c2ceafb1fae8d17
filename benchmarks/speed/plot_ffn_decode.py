"""Plot benchmarks/results/speed_ffn_decode.json (written by ffn_decode.py) as a PNG.

    python3 benchmarks/speed/plot_ffn_decode.py benchmarks/results/speed_ffn_decode.json benchmarks/results/speed_ffn_decode.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    data = json.load(open(src))
    rows = data["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5 * (len(shapes) + 1), 4.2))
    for ax, shape in zip(axes, shapes):
        rs = [r for r in rows if r["shape"] == shape and r["B"] == 1]
        s = [r["s"] for r in rs]
        ax.plot(s, [r["dense_us"] for r in rs], "k-o", label="dense (Inductor, CUDA graph)")
        ax.plot(s, [r["compact_us"] for r in rs], "k:", label="compact dense (1-s) d_inter")
        ax.plot(s, [r["m_us"] for r in rs], "b-o", label="M-CountDown (ours)")
        ax.plot(s, [r["m_ceil_us"] for r in rs], "b--", label="M bytes ceiling")
        ax.plot(s, [r["d_us"] for r in rs], "r-o", label="D-CountDown (ours, predictor incl.)")
        ax.plot(s, [r["d_ceil_us"] for r in rs], "r--", label="D bytes ceiling")
        ax.set_title(f"{shape}, batch 1")
        ax.set_xlabel("sparsity s")
        ax.set_ylabel("µs per FFN layer")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    shape = shapes[0]
    for sp, style in ((0.7, "-"), (0.9, "--")):
        rs = [r for r in rows if r["shape"] == shape and r["s"] == sp]
        bs = [r["B"] for r in rs]
        ax.plot(bs, [r["dense_us"] / r["m_us"] for r in rs], "b" + style + "o", label=f"M, s={sp}")
        ax.plot(bs, [r["dense_us"] / r["d_us"] for r in rs], "r" + style + "o", label=f"D, s={sp}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per decode step (B)")
    ax.set_ylabel("speed-up over dense")
    ax.set_title(f"{shape}: batched decode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{data['device']}, bf16, commit {data['commit']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="speed_ffn_decode.json")
    ap.add_argument("dst", help="the PNG to write")
    args = ap.parse_args()
    main(args.src, args.dst)
