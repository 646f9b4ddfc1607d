"""Drawing: reconstruction grids, attention maps, line charts. The run report that puts them on a page is
`mimkit.report` (it reads checkpoints, so it sits above the engine; these drawings sit below it)."""

from mimkit.viz.attention import colorize, render_attention_grid
from mimkit.viz.plots import line_chart_svg
from mimkit.viz.reconstruction import render_reconstruction_grid, save_reconstruction_grid

__all__ = ["colorize", "line_chart_svg", "render_attention_grid", "render_reconstruction_grid",
           "save_reconstruction_grid"]
