"""Figures: plain functions from results to plotly figures, with no Streamlit, shared by the app,
the command line and the benchmark."""

from mka_core.figures.compare import compare_figure
from mka_core.figures.manifold import (
    PROJECTION_NAMES,
    manifold_animation,
    manifold_figure,
    robust_range,
    row_colors,
)
from mka_core.figures.plans import plan_figure
from mka_core.figures.runs import before_after_figure, comparison_figure, history_figure
from mka_core.figures.similarity import (
    MEASURE_NAMES,
    bi_figure,
    heatmap_figure,
    importance_figure,
    spread_figure,
)
from mka_core.figures.transact import heal_loss_figure, transact_figures

__all__ = [
    "MEASURE_NAMES",
    "PROJECTION_NAMES",
    "before_after_figure",
    "bi_figure",
    "compare_figure",
    "comparison_figure",
    "heal_loss_figure",
    "heatmap_figure",
    "history_figure",
    "importance_figure",
    "manifold_animation",
    "manifold_figure",
    "plan_figure",
    "robust_range",
    "row_colors",
    "spread_figure",
    "transact_figures",
]
