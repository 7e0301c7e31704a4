"""Writing the experiments' figures: one place for the layout, the folder and closing the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out a matplotlib `fig`, write it to `path` (creating its folder), close it; → the path.

    Closing matters: experiments draw many figures in one process, and pyplot keeps every open one.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
