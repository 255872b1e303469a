"""The paper's numbers and the grids of our reproductions (Song, Meng & Ermon, ICLR 2021)."""

import os

TABLE1_STEPS = (10, 20, 50, 100, 1000)
TABLE1_ETAS = (0.0, 0.2, 0.5, 1.0, "ddpm_large")
TABLE1_SKIPS = ("uniform", "quad")
TABLE1_SPREAD_STEPS = (10, 20, 50, 100)
TABLE2_STEPS = (10, 20, 50, 100, 200, 500, 1000)
TIMING_STEPS = (10, 20, 50, 100, 200, 500, 1000)
DEFAULT_OUT_DIR = os.path.join("docs", "results")
# The solvers comparison: each multistep cell at S against DDIM at 5 S (S = 10 vs 50, 20 vs 100).
SOLVER_CELLS = (("dpmpp_3m", "logsnr", 10), ("dpmpp_2m", "logsnr", 10), ("ddim", "uniform", 10), ("ddim", "uniform", 50),
                ("dpmpp_3m", "logsnr", 20), ("dpmpp_2m", "logsnr", 20), ("ddim", "uniform", 20), ("ddim", "uniform", 100))

# Table 1 of the paper (FID of 50k samples), as transcribed in the slides (seeds/003).
# Rows: eta; "ddpm_large" is sigma-hat.
PAPER_TABLE1 = {
    "CIFAR10 (32x32)": {
        0.0: (13.36, 6.84, 4.67, 4.16, 4.04),
        0.2: (14.04, 7.11, 4.77, 4.25, 4.09),
        0.5: (16.66, 8.35, 5.25, 4.46, 4.29),
        1.0: (41.07, 18.36, 8.01, 5.78, 4.73),
        "ddpm_large": (367.43, 133.37, 32.72, 9.99, 3.17),
    },
    "CelebA (64x64)": {
        0.0: (17.33, 13.73, 9.17, 6.53, 3.51),
        0.2: (17.66, 14.11, 9.51, 6.79, 3.64),
        0.5: (19.86, 16.06, 11.01, 8.09, 4.28),
        1.0: (33.12, 26.03, 18.48, 13.93, 5.98),
        "ddpm_large": (299.71, 183.83, 71.71, 45.20, 3.26),
    },
}
# Table 2 of the paper (CIFAR-10 test set, per-dimension MSE in [0, 1]). Not in the seed copy
# (its tables were lost in extraction): quoted from the published paper (arXiv 2010.02502),
# to be checked against it.
PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}
