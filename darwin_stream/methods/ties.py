"""ties: keep each task vector's top-`density` magnitudes, elect a sign by weighted sum, merge agreeing deltas."""

from darwin_stream.methods.contract import doc_summary
from darwin_stream.methods.gta import Sparsification, make_gta

TIES = make_gta(
    "ties",
    summary=doc_summary(__doc__, "ties"),
    sparsification=Sparsification.MAGNITUDE,
    consensus=True,
    default_normalize=True,
    default_rescale=False,
)
