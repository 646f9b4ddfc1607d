from mimkit.viz.attention import colorize, render_attention_grid
from mimkit.viz.plots import line_chart_svg
from mimkit.viz.reconstruction import render_reconstruction_grid, save_reconstruction_grid
from mimkit.viz.report import build_report

__all__ = ["build_report", "colorize", "line_chart_svg", "render_attention_grid", "render_reconstruction_grid",
           "save_reconstruction_grid"]
