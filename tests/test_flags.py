"""Every numeric flag of the reading scripts takes a value within its bounds or refuses it with one
line naming the flag (training's flags have the same test in test_train.py)."""

import contextlib
import io
import math
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

import bench
import evaluate
import predict

OUT = tempfile.mkdtemp(prefix="flags-")  # evaluate.py makes its --out folder before loading the model
NO_CHECKPOINT = ["--checkpoint", "/no-such-folder/none.pt"]  # a value taken ends at the missing checkpoint
SCRIPTS = {
    "predict": (predict.main, ["/no-such-folder/x.png"]),
    "evaluate": (evaluate.main, ["/no-such-folder/set", "--out", OUT]),
    "bench": (bench.main, []),
}
# (script, flag, type, lowest, highest): the bounds each script promises.
FLAGS = [
    ("predict", "--batch-size", int, 1, 4096),
    ("predict", "--beam-size", int, 1, 32),
    ("predict", "--min-confidence", float, 0.0, 1.0),
    ("evaluate", "--batch-size", int, 1, 4096),
    ("evaluate", "--beam-size", int, 1, 32),
    ("evaluate", "--gallery-size", int, 0, 1000),
    ("bench", "--batch-size", int, 1, 4096),
    ("bench", "--seconds", float, 0.01, 3600),
    ("bench", "--latency-runs", int, 2, 100_000),
    ("bench", "--rounds", int, 1, 1000),
]


@settings(max_examples=200, deadline=None)
@given(
    flag=st.sampled_from(FLAGS),
    value=st.one_of(
        st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)
    ),
)
def test_any_value_of_a_numeric_flag_is_taken_within_bounds_or_refused_naming_the_flag(flag, value):
    script, name, kind, low, high = flag
    main, positional = SCRIPTS[script]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([*positional, *NO_CHECKPOINT, name, str(value)])
        except SystemExit as exited:
            code = exited.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1, lines  # one line, never a traceback
    if "no checkpoint at" in lines[0]:  # taken: it passed every check of the script
        taken = kind(str(value))
        assert math.isfinite(taken) and low <= taken <= high, (name, value)
    else:
        assert name in lines[0], lines[0]
