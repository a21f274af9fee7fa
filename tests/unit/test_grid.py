"""Config grid → cells: expansion, stable ids, refusals."""
import pytest

from moesweep.grid import Cell, GridError, config_hash, expand_grid

DEFAULT_LIKE = [
    {"family": "native", "routing": {"policy": "native"}, "precision": {"policy": "full"}},
    {"family": "cf", "routing": {"policy": "topk", "top_k": 1, "capacity_factor": [0.5, 1.0, None]},
     "precision": {"policy": "full"}},
    {"family": "uniform", "routing": {"policy": "native"}, "precision": {"policy": "uniform", "bits": [8, 2]}},
    {"family": "hotcold", "routing": {"policy": "native"},
     "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 2, "memory_budget": [0.25, 0.5]}},
]


def test_expansion_order_and_ids():
    ids = [c.id for c in expand_grid(DEFAULT_LIKE)]
    assert ids == ["native-w16", "top1-cf0.5-w16", "top1-cf1-w16", "top1-w16", "native-w8", "native-w2",
                   "native-hot8-cold2-b0.25", "native-hot8-cold2-b0.5"]


def test_cross_product_of_routing_and_precision():
    cells = expand_grid([{"routing": {"policy": "topk", "top_k": [1, 2]}, "precision": {"policy": "uniform", "bits": [4, 8]}}])
    assert len(cells) == 4 and {c.precision.widths for c in cells} == {(4,), (8,)}


def test_round_trip_through_dict():
    for c in expand_grid(DEFAULT_LIKE):
        assert Cell.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("entry,message", [
    ({"routing": {"policy": "nope"}, "precision": {"policy": "full"}}, "unknown routing policy 'nope'"),
    ({"routing": {"policy": "topk", "top_k": 0}, "precision": {"policy": "full"}}, "top_k must be an integer"),
    ({"routing": {"policy": "topk", "top_k": 1, "capacity_factor": 0}, "precision": {"policy": "full"}}, "capacity_factor must be > 0"),
    ({"routing": {"policy": "top_p", "top_p": 1.5}, "precision": {"policy": "full"}}, "top_p must be in (0, 1]"),
    ({"routing": {"policy": "top_p"}, "precision": {"policy": "full"}}, "top_p (in (0, 1]) is required"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "uniform", "bits": 5}}, "bits must be one of"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "hotcold", "bits_high": 2, "bits_low": 8, "memory_budget": 0.5}}, "bits_low < bits_high"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 2, "memory_budget": 0}}, "memory_budget must be a fraction"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "fp4"}}, "unknown precision policy 'fp4'"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "offload", "memory_budget": 0.5, "memory_budget_gb": 3}},
     "give exactly one of memory_budget"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "offload"}}, "give exactly one of memory_budget"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "dynamic", "bits_high": 8, "bits_low": 2,
                                                     "memory_budget_gb": -1}}, "memory_budget_gb must be a number of GB > 0"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 2,
                                                     "memory_budget": 0.5, "allocation": "greedy"}}, "allocation must be one of"),
    ({"routing": {"policy": "native"}, "precision": {"policy": "offload", "memory_budget": 0.5, "allocation": "hotness"}},
     "allocation not allowed with precision policy 'offload'"),
])
def test_bad_entries_are_refused_with_a_clear_message(entry, message):
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        expand_grid([entry])


def test_empty_and_duplicate_grids_are_refused():
    with pytest.raises(GridError, match="empty"):
        expand_grid([])
    with pytest.raises(GridError, match="already produced"):
        expand_grid([DEFAULT_LIKE[0], DEFAULT_LIKE[0]])


def test_config_hash_is_stable_and_sensitive():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_presets_validate_against_the_schema_and_expand():
    from pathlib import Path

    import jsonschema
    import yaml

    root = Path(__file__).resolve().parents[2]
    schema = yaml.safe_load((root / "workflow/schemas/config.schema.yaml").read_text())
    for path in [root / "config/config.yaml", *sorted((root / "config/presets").glob("*.yaml"))]:
        cfg = yaml.safe_load(path.read_text())
        jsonschema.validate(cfg, schema)
        assert expand_grid(cfg["grid"]), path


def test_dynamic_cells_and_their_refusals():
    cells = expand_grid([{"routing": {"policy": "native"}, "precision": {"policy": "dynamic", "bits_high": 8, "bits_low": 2,
                                                                        "memory_budget": 0.25, "update_every": [200, 50]}}])
    assert [c.id for c in cells] == ["native-dyn8-cold2-b0.25", "native-dyn8-cold2-b0.25-u50"]
    assert cells[0].precision.alpha == 0.9 and cells[0].precision.rate_limit == 4
    with pytest.raises(GridError, match=r"alpha must be in \(0, 1\)"):
        expand_grid([{"routing": {"policy": "native"}, "precision": {"policy": "dynamic", "bits_high": 8, "bits_low": 2,
                                                                     "memory_budget": 0.25, "alpha": 1.0}}])
    assert expand_grid([{"routing": {"policy": "native"}, "precision": {"policy": "offload", "memory_budget": 0.5}}])[0].id == "native-offload-b0.5"


def test_budget_in_gb_and_hotness_allocation_name_their_cells():
    cells = expand_grid([{"routing": {"policy": "native"}, "precision": {
        "policy": "dynamic", "bits_high": 16, "bits_low": 4, "memory_budget_gb": 38, "allocation": ["uniform", "hotness"]}}])
    assert [c.id for c in cells] == ["native-dyn16-cold4-b38GB", "native-dyn16-cold4-b38GB-alloc_hot"]
    assert cells[1].precision.memory_budget is None and cells[1].precision.allocation == "hotness"
