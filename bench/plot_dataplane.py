#!/usr/bin/env python3
"""Bar chart of a bench/dataplane run: one panel per figure, medians over the rounds.

Usage: python3 bench/plot_dataplane.py RESULTS OUT.png   (RESULTS: lines "path key=value ...")
Needs matplotlib (python3 -m pip install matplotlib).
"""
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "bare": "bare veth",
    "hostgw": "hand-made\nroutes",
    "vxlan": "hand-made\nvxlan",
    "thostgw": "tweed\nhost-gw",
    "tvxlan": "tweed\nvxlan",
    "tudp": "tweed\nudp",
    "relay": "naive relay\n(flannel udp)",
    "twg": "tweed\nwireguard",
    "wggo": "wireguard-go",
    "tweed": "tweed (lab)\nvxlan",
    "tvxlan6": "tweed vxlan\nIPv6 (lab)",
    "tdual4": "tweed vxlan\nIPv4 (dual lab)",
    "tudp6": "tweed udp\nIPv6 (lab)",
    "tudpd4": "tweed udp\nIPv4 (dual lab)",
}
PANELS = [
    ("tcp1", "TCP, 1 stream (Gbit/s)"),
    ("tcp4", "TCP, 4 streams (Gbit/s)"),
    ("udp64", "UDP 64 B (kpps received)"),
    ("p50", "RTT p50 (us, lower is better)"),
    ("p99", "RTT p99 (us, lower is better)"),
    ("cpugb", "TCP 1 stream: CPU s per GB (lower is better)"),
    ("pathgb", "TCP 1 stream: the path's CPU s per GB (lower is better)"),
]


def main(results, out):
    runs = {}
    order = []
    for line in open(results):
        parts = line.split()
        if not parts:
            continue
        path = parts[0]
        if path not in runs:
            runs[path] = {}
            order.append(path)
        for kv in parts[1:]:
            k, v = kv.split("=", 1)
            runs[path].setdefault(k, []).append(float(v))
    panels = [(k, t) for k, t in PANELS if any(k in runs[p] for p in order)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    if len(panels) == 1:
        axes = [axes]
    colors = ["#999999" if p in ("bare", "hostgw", "vxlan") else "#d62728" if p == "relay" else "#1f77b4" for p in order]
    for ax, (key, title) in zip(axes, panels):
        vals = [statistics.median(runs[p][key]) if key in runs[p] else 0 for p in order]
        bars = ax.bar(range(len(order)), vals, color=colors)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([LABELS.get(p, p) for p in order], fontsize=7, rotation=45, ha="right")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    fig.suptitle("tweed data planes, two namespace hosts on one 2-core machine (grey: hand-made, blue: tweed, red: floor)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
