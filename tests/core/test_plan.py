import json

import pytest

from core.base.errors import RecipeError
from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, QuantConfig, simple_plan


def test_recipe_round_trip_exact(tmp_path):
    plan = simple_plan(0.9, 5).with_layer(
        "fc3", LayerConfig(PruneConfig("magnitude", sparsity=0.7), QuantConfig(6, False, True))
    )
    path = tmp_path / "r.json"
    plan.save(path)
    again = CompressionPlan.load(path)
    assert again == plan
    assert again.to_json() == plan.to_json()


@pytest.mark.parametrize(
    "recipe, field",
    [
        ({"default": {"quant": {"bits": 17}}}, "default.quant.bits"),
        ({"default": {"quant": {"bits": 1}}}, "default.quant.bits"),
        ({"default": {"prune": {"sparsity": 1.5}}}, "default.prune.sparsity"),
        ({"default": {"prune": {"method": "random"}}}, "default.prune.method"),
        ({"layers": {"fc1": {"prune": {"methd": "magnitude"}}}}, "layers.fc1.prune.methd"),
        ({"layers": {"fc1": {"prune": {"scope": "global"}}}}, "layers.fc1.prune.scope"),
        ({"version": 99}, "recipe.version"),
        ({"extra": 1}, "recipe.extra"),
        ({"recovery": {"alpha": 2}}, "recovery.alpha"),
        ({"default": {"skip": "yes"}}, "default.skip"),
    ],
)
def test_recipe_rejects_bad_fields_naming_them(recipe, field):
    with pytest.raises(RecipeError) as info:
        CompressionPlan.from_json(json.dumps(recipe))
    assert field in str(info.value)


def test_bad_json_names_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(RecipeError, match="bad.json"):
        CompressionPlan.load(p)


def test_effective_config_and_global_pool():
    plan = simple_plan(0.8, 4)
    assert plan.is_global_member("fc1")
    cfg = LayerConfig(quant=QuantConfig(bits=8))
    plan2 = plan.with_layer("fc1", cfg)
    assert plan2.config_for("fc1") == cfg and not plan2.is_global_member("fc1")
    assert plan2.without_layer("fc1") == plan
