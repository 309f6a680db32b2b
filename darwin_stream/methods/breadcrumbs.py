"""breadcrumbs / breadcrumbs_ties: drop each task vector's largest `gamma` and smallest magnitudes,
keeping a `density` fraction in between (Model Breadcrumbs), then merge linearly or with TIES consensus."""

from darwin_stream.methods import register
from darwin_stream.methods._gta import OUTLIERS, make_gta

BREADCRUMBS = register(
    make_gta(
        "breadcrumbs",
        sparsification=OUTLIERS,
        consensus=False,
        default_normalize=False,
        default_rescale=False,
    )
)
BREADCRUMBS_TIES = register(
    make_gta(
        "breadcrumbs_ties",
        sparsification=OUTLIERS,
        consensus=True,
        default_normalize=False,
        default_rescale=False,
    )
)
