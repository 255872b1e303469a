"""The paper's experiments: Table 1, Table 2, Figure 4, the solvers comparison and the figures.

    ddim-fast eval table1  [--n 500] [--max-minutes M]   FD vs S x eta, "uniform" and "quad" (Table 1)
    ddim-fast eval table2  [--n 100]                     encode -> decode MSE vs S (Table 2)
    ddim-fast eval timing                                seconds per sample vs S (Figure 4)
    ddim-fast eval solvers [--n 1000]                    multistep solvers at S vs DDIM at 5 S
    ddim-fast eval fd --npz FILE                         the score of a sampled .npz
    ddim-fast figure consistency | interpolate | sequence             PNG grids (Figs. 5, 6, 7-8)

Layout: ``paper`` (the paper's numbers and our grids), ``driver`` (the one loop of cached
cells within a time budget), ``tables`` (the runs), ``render`` (Markdown and plots),
``figures`` (PNG grids with Pillow, line plots with the optional matplotlib). The command line
is ``ddim_fast.cli``; sampling at scale is ``ddim_fast.sharded``.
"""

from ddim_fast.experiments.driver import load
from ddim_fast.experiments.figures import (MissingExtraError, figure_consistency, figure_interpolate, figure_sequence,
                                           labeled_grid, line_plot)
from ddim_fast.experiments.paper import (DEFAULT_OUT_DIR, PAPER_TABLE1, PAPER_TABLE2, SOLVER_CELLS, TABLE1_ETAS,
                                         TABLE1_SKIPS, TABLE1_SPREAD_STEPS, TABLE1_STEPS, TABLE2_STEPS, TIMING_STEPS)
from ddim_fast.experiments.tables import npz_scores, solvers_table, table1, table2, timing

__all__ = [
    "table1", "table2", "timing", "solvers_table", "npz_scores", "figure_consistency", "figure_interpolate",
    "figure_sequence", "labeled_grid", "line_plot", "MissingExtraError", "load", "PAPER_TABLE1", "PAPER_TABLE2",
    "TABLE1_STEPS", "TABLE1_ETAS", "TABLE1_SKIPS", "TABLE1_SPREAD_STEPS", "TABLE2_STEPS", "TIMING_STEPS",
    "SOLVER_CELLS", "DEFAULT_OUT_DIR",
]
