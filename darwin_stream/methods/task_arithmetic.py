"""task_arithmetic: base + lambda * sum_i w_i (model_i - base), optionally divided by sum_i w_i."""

from darwin_stream.methods import register
from darwin_stream.methods._gta import make_gta

TASK_ARITHMETIC = register(
    make_gta(
        "task_arithmetic",
        sparsification=None,
        consensus=False,
        default_normalize=False,
        default_rescale=False,
    )
)
