"""task_arithmetic: base + lambda * sum_i w_i (model_i - base), optionally divided by sum_i w_i."""

from darwin_stream.methods.contract import doc_summary
from darwin_stream.methods.gta import Sparsification, make_gta

TASK_ARITHMETIC = make_gta(
    "task_arithmetic",
    summary=doc_summary(__doc__, "task_arithmetic"),
    sparsification=Sparsification.NONE,
    consensus=False,
    default_normalize=False,
    default_rescale=False,
)
