from darwin_stream.methods import REQUIRED, get, names, pass_count

# mergekit 0.1.5's other methods, as they land (tests/methods/test_<name>.py for each).
MERGEKIT_0_1_5_MORE = ["nearswap", "nuslerp", "multislerp", "karcher", "della", "della_linear", "sce", "arcee_fusion", "ram", "ramplus_tl"]


def test_all_methods_registered_with_mergekit_parameters():
    assert names() == sorted(
        [
            "linear",
            "slerp",
            "task_arithmetic",
            "ties",
            "dare_linear",
            "dare_ties",
            "breadcrumbs",
            "breadcrumbs_ties",
            "model_stock",
            "passthrough",
            *MERGEKIT_0_1_5_MORE,
        ]
    )
    assert get("linear").param_defaults == {"normalize": True}
    assert get("linear").model_param_defaults == {"weight": REQUIRED}
    assert get("slerp").param_defaults == {"t": REQUIRED}
    assert get("model_stock").param_defaults == {"filter_wise": False}
    assert get("passthrough").model_param_defaults == {"scale": None}
    gta = {"ties": (True, False), "dare_ties": (False, True), "dare_linear": (False, True)}
    gta |= {
        "task_arithmetic": (False, False),
        "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False),
    }
    for name, (normalize, rescale) in gta.items():
        m = get(name)
        assert m.needs_base
        assert m.param_defaults == {
            "int8_mask": False,
            "normalize": normalize,
            "rescale": rescale,
            "lambda": 1.0,
        }
        assert m.model_param_defaults["weight"] is REQUIRED
        assert m.model_param_defaults["density"] == 1.0
        assert ("gamma" in m.model_param_defaults) == name.startswith("breadcrumbs")
        assert m.random == name.startswith("dare")


def test_statistic_passes():
    assert get("linear").statistic is None and get("passthrough").statistic is None
    assert get("task_arithmetic").statistic is None
    assert get("slerp").statistic.passes == 1
    stock = get("model_stock").statistic
    assert pass_count(stock, (8, 4), {"filter_wise": False}) == 1
    assert pass_count(stock, (8, 4), {"filter_wise": True}) == 0  # each vector lies in one block
    assert pass_count(stock, (8,), {"filter_wise": True}) == 1  # a 1-D tensor is one vector
    assert get("dare_ties").statistic.passes == 1
    assert get("ties").statistic.passes == 3  # histograms, the window's edges, its tie counts
    assert get("breadcrumbs").statistic.passes == 3
