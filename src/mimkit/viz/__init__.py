from mimkit.viz.reconstruction import render_reconstruction_grid, save_reconstruction_grid

__all__ = ["render_reconstruction_grid", "save_reconstruction_grid"]
