"""ties: keep each task vector's top-`density` magnitudes, elect a sign by weighted sum, merge agreeing deltas."""

from darwin_stream.methods import register
from darwin_stream.methods._gta import MAGNITUDE, make_gta

TIES = register(
    make_gta("ties", sparsification=MAGNITUDE, consensus=True, default_normalize=True, default_rescale=False)
)
