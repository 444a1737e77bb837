"""What every longctx plot shares: a headless pyplot and one way to finish and save a figure."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_line_plot(fig, ax, out_png: str) -> str:
    """Grid, legend, tight layout; write `out_png` and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    pyplot().close(fig)
    return out_png


__all__ = ["pyplot", "save_line_plot"]
