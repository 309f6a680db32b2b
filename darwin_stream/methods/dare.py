"""dare_linear / dare_ties: drop each task-vector element with probability 1 - density, rescale, merge.

The drop is a hash of (tensor seed, model index, flat element index), so a child is reproducible from
its manifest seed and independent of how the engine chunks a tensor.
"""

from darwin_stream.methods import register
from darwin_stream.methods._gta import RANDOM, make_gta

DARE_LINEAR = register(
    make_gta(
        "dare_linear", sparsification=RANDOM, consensus=False, default_normalize=False, default_rescale=True
    )
)
DARE_TIES = register(
    make_gta(
        "dare_ties", sparsification=RANDOM, consensus=True, default_normalize=False, default_rescale=True
    )
)
