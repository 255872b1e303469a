"""The one contract of the fused step: the coefficient table's columns and the op's encodings.

Every solver is a table. Row k holds float64 coefficients (stored as float32 on the sampling
device) that one elementwise pass evaluates over a fixed set of operands:

    m          the model output at x_t (epsilon, v or x0 prediction: PREDICTIONS)
    x0, eps    m converted with the row's sqrt(alpha_t), sqrt(1 - alpha_t); x0 clamped to
               [-clip, clip] when clip > 0 (eps stays the model's, as DDIM does)
    H[k - j]   j = 1..3: a ring of earlier converted outputs, x0 or eps (HISTORY_KINDS, one
               flag per trajectory); slot (k - j) mod R of an (R, *shape) buffer
    x_saved    an earlier state kept by a predictor-corrector (UniPC)
    z          Philox noise (reference.gaussian), only where the row's sigma != 0

    x_next  = c_x x_t + c_x0 x0 + c_eps eps + c_saved x_saved + sum_j c_hj H[k - j] + sigma z
    x_saved <- d_x x_t + d_x0 x0 + d_eps eps + d_saved x_saved + sum_j d_hj H[k - j]
    H[k mod R] <- x0 or eps

A history term whose coefficient is 0 is never read (the ring may hold anything there, NaN
included: the first steps read nothing). All reads of an element happen before its writes, so
``out`` may alias ``x`` and the ring needs no spare slot. The op also writes
``flags[k, FLAG_MODEL] = 1`` when the model output it reads has a non-finite element and
``flags[k, FLAG_STATE] = 1`` when x_next does, so the finite check costs no extra pass.

This file is plain Python with no imports: the reference, the Triton kernel and the solvers
import it, and the C++ kernel is compiled with ``cxx_defines()`` (setup.py and the JIT build
read it without importing the package), so the layout is written down exactly once.
"""

# Bumped whenever anything below changes: a compiled kernel built against another version is
# refused (ddim_fast.ops), so a stale build can never read the table with the wrong columns.
CONTRACT_VERSION = 2

COLUMNS = (
    "sqrt_alpha",  # converts the model output at x_t
    "sqrt_one_minus_alpha",
    "c_x",
    "c_x0",
    "c_eps",
    "c_saved",
    "sigma",
    "c_h1",
    "c_h2",
    "c_h3",
    "d_x",  # the saved-state update (predictor-correctors only)
    "d_x0",
    "d_eps",
    "d_saved",
    "d_h1",
    "d_h2",
    "d_h3",
)
NUM_COLUMNS = len(COLUMNS)
HISTORY_TERMS = 3  # H[k - 1], H[k - 2], H[k - 3]

SQRT_ALPHA = COLUMNS.index("sqrt_alpha")
SQRT_ONE_MINUS_ALPHA = COLUMNS.index("sqrt_one_minus_alpha")
C_X = COLUMNS.index("c_x")
C_X0 = COLUMNS.index("c_x0")
C_EPS = COLUMNS.index("c_eps")
C_SAVED = COLUMNS.index("c_saved")
SIGMA = COLUMNS.index("sigma")
C_H = COLUMNS.index("c_h1")  # c_hj is column C_H + j - 1
D_X = COLUMNS.index("d_x")
D_X0 = COLUMNS.index("d_x0")
D_EPS = COLUMNS.index("d_eps")
D_SAVED = COLUMNS.index("d_saved")
D_H = COLUMNS.index("d_h1")

# Integer encodings the op takes.
PREDICTIONS = {"epsilon": 0, "v": 1, "x0": 2}
HISTORY_KINDS = {"x0": 0, "eps": 1}

# flags: an (S, 2) int32 buffer, one row per step.
FLAG_MODEL = 0
FLAG_STATE = 1

# Philox counter word 3 carries the stream in its low 16 bits and bits 32..47 of the global
# sample index in its high 16 bits (word 1 holds bits 0..31): sample indices up to 2**48.
STREAM_X_T = 0
STREAM_STEP = 1
STREAM_BITS = 16
MAX_SAMPLES = 2**48


def cxx_defines():
    """-D flags that give the C++ kernel the same column indices (DDIM_COL_<NAME>) and encodings."""
    flags = [f"-DDDIM_CONTRACT_VERSION={CONTRACT_VERSION}"]
    flags += [f"-DDDIM_COL_{name.upper()}={i}" for i, name in enumerate(COLUMNS)]
    flags += [f"-DDDIM_NUM_COLUMNS={NUM_COLUMNS}", f"-DDDIM_HISTORY_TERMS={HISTORY_TERMS}"]
    flags += [f"-DDDIM_PRED_{name.upper()}={code}" for name, code in PREDICTIONS.items()]
    flags += [f"-DDDIM_HISTORY_{name.upper()}={code}" for name, code in HISTORY_KINDS.items()]
    flags += [f"-DDDIM_FLAG_MODEL={FLAG_MODEL}", f"-DDDIM_FLAG_STATE={FLAG_STATE}"]
    flags += [f"-DDDIM_STREAM_X_T={STREAM_X_T}", f"-DDDIM_STREAM_STEP={STREAM_STEP}", f"-DDDIM_STREAM_BITS={STREAM_BITS}"]
    return flags
