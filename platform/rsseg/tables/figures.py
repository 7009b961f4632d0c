"""Figures 9 and 10 as PNG (matplotlib, Agg): ours with seed error bars, the paper's values where
the paper states them. The CSV beside each PNG holds exactly the plotted numbers."""

from __future__ import annotations

import io


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _banner(b) -> str:
    return "\nsynthetic data: not comparable to the paper" if b.group.get("dataset") == "synthetic" or b.group.get("profile") == "smoke" else ""


def render(b) -> bytes:
    return fig9(b) if b.layout.id == "fig9" else fig10(b)


def fig9(b) -> bytes:
    """Bars: one per pre-training strategy (+ ImageNet), ours beside the paper's (hatched)."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    keys = [k for k, _ in b.rows]
    labels = [lab.replace(" (", "\n(") for _, lab in b.rows]
    x = list(range(len(keys)))
    w = 0.38
    ours = [b.cell(k, "mIoU") for k in keys]
    ax.bar([i - w / 2 for i in x], [c.mean if c.n else 0 for c in ours], w, yerr=[(c.std or 0) if c.n else 0 for c in ours],
           capsize=3, color="#3a7ca5", label="ours (mean ± std over seeds)")
    paper = [b.paper.get((k, "mIoU")) for k in keys]
    ax.bar([i + w / 2 for i in x], [p or 0 for p in paper], w, color="white", edgecolor="#c46210", hatch="//",
           label="paper (Luo et al. 2025)")
    for i, (c, p) in enumerate(zip(ours, paper)):
        ax.text(i - w / 2, (c.mean or 0) + 0.5, f"{c.mean:.1f}" if c.n else "no runs", ha="center", va="bottom", fontsize=8)
        ax.text(i + w / 2, (p or 0) + 0.5, f"{p:.1f}" if p is not None else "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8, rotation=20, ha="right")  # the strategies' names overlapped side by side
    ax.set_ylabel("mIoU (%)")
    top = max([c.mean + (c.std or 0) for c in ours if c.n] + [p for p in paper if p is not None] + [10])
    ax.set_ylim(0, top * 1.3)
    ax.set_title("Pre-training strategies, 2 % labels" + _banner(b), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, plt)


def fig10(b) -> bytes:
    """Lines: mIoU against the homogeneous share of pre-training iterations, one per dataset."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for rk, label in b.rows:
        pts = [(float(ck) * 100, b.cell(rk, ck)) for ck, _ in b.columns if b.cell(rk, ck).n]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std or 0 for p in pts], marker="o",
                        capsize=3, label=label)
    ax.set_xlim(-3, 103)
    if not any(b.cell(rk, ck).n for rk, _ in b.rows for ck, _ in b.columns):
        ax.set_ylim(0, 100)
    ax.axvline(10, color="grey", ls=":", lw=1)
    ax.text(10, ax.get_ylim()[0], " paper's choice: 20k of 200k (10 %)", rotation=90, va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("homogeneous share of pre-training iterations (%)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU vs homogeneous pre-training share" + _banner(b), fontsize=10)
    if b.rows:
        ax.legend(title="dataset", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no runs yet:\nplatform sweep " + b.layout.sweep, transform=ax.transAxes, ha="center", va="center")
    ax.grid(alpha=0.3)
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
