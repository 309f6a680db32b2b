"""breadcrumbs / breadcrumbs_ties: drop each task vector's largest `gamma` and smallest magnitudes,
keeping a `density` fraction in between (Model Breadcrumbs), then merge linearly or with TIES consensus."""

from darwin_stream.methods.contract import doc_summary
from darwin_stream.methods.gta import Sparsification, make_gta

BREADCRUMBS = make_gta(
    "breadcrumbs",
    summary=doc_summary(__doc__, "breadcrumbs"),
    sparsification=Sparsification.OUTLIERS,
    consensus=False,
    default_normalize=False,
    default_rescale=False,
)
BREADCRUMBS_TIES = make_gta(
    "breadcrumbs_ties",
    summary=doc_summary(__doc__, "breadcrumbs_ties"),
    sparsification=Sparsification.OUTLIERS,
    consensus=True,
    default_normalize=False,
    default_rescale=False,
)
