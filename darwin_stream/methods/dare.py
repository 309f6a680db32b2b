"""dare_linear / dare_ties: drop each task-vector element with probability 1 - density, rescale, merge.

The drop is a hash of (tensor seed, model index, flat element index), so a child is reproducible from
its manifest seed and independent of how the engine chunks a tensor.
"""

from darwin_stream.methods.contract import doc_summary
from darwin_stream.methods.gta import Sparsification, make_gta

DARE_LINEAR = make_gta(
    "dare_linear",
    summary=doc_summary(__doc__, "dare_linear"),
    sparsification=Sparsification.RANDOM,
    consensus=False,
    default_normalize=False,
    default_rescale=True,
)
DARE_TIES = make_gta(
    "dare_ties",
    summary=doc_summary(__doc__, "dare_ties"),
    sparsification=Sparsification.RANDOM,
    consensus=True,
    default_normalize=False,
    default_rescale=True,
)
