"""Small pieces every figure module uses."""

from __future__ import annotations


def centred_title(text: str, size: int | None = None) -> dict:
    """A plotly title centred over the plot (in `size` points, or plotly's default size)."""
    title = {"text": text, "x": 0.5, "xanchor": "center"}
    if size is not None:
        title["font"] = {"size": size}
    return title
