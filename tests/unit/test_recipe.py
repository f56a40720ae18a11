"""Recipes: validation with the valid choices named, YAML files, presets."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.compiler.context import PassContext
from lowbit.compiler.manager import PassManager
from lowbit.compiler.recipe import PassSpec, Recipe, load_recipe, schedule


def _schedule(data, registry):
    return schedule(Recipe.from_dict(data), registry)


def test_unknown_top_level_key_lists_the_valid_keys():
    with pytest.raises(lowbit.RecipeError) as info:
        Recipe.from_dict({"name": "x", "passes": ["rtn", "pack"], "bitz": 4})
    msg = str(info.value)
    assert "['bitz']" in msg and "valid keys: ['name', 'description', 'passes']" in msg


def test_unknown_step_key_lists_the_valid_keys():
    with pytest.raises(lowbit.RecipeError, match=r"step #2.*\['opts'\].*\['pass', 'options'\]"):
        Recipe.from_dict({"passes": ["rtn", {"pass": "pack", "opts": {}}]})


@pytest.mark.parametrize("data,match", [
    ({"passes": []}, "non-empty list"),
    ({"name": "x"}, "non-empty list"),
    (["rtn"], "must be a mapping"),
    ({"passes": [{"rtn": {}, "pack": {}}]}, "step #1 must be a pass name"),
    ({"passes": [{"rtn": [4]}]}, "options of pass step #1 must be a mapping"),
    ({"passes": [3]}, "step #1 has unsupported type int"),
])
def test_malformed_recipes_are_rejected(data, match):
    with pytest.raises(lowbit.RecipeError, match=match):
        Recipe.from_dict(data)


def test_unknown_pass_lists_the_registered_passes(registry):
    with pytest.raises(lowbit.RecipeError) as info:
        _schedule({"passes": ["rtn", "hqq", "pack"]}, registry)
    msg = str(info.value)
    assert "unknown pass 'hqq'" in msg
    listed = msg.split("registered passes: ")[1]
    assert all(f"'{name}'" in listed for name in ("act_quant", "calibrate", "pack", "rtn", "gptq", "rotate", "mixed"))


def test_unknown_option_lists_the_valid_options(registry):
    with pytest.raises(lowbit.RecipeError) as info:
        _schedule({"passes": [{"rtn": {"bitz": 4}}, "pack"]}, registry)
    msg = str(info.value)
    assert "pass 'rtn' has no option(s) ['bitz']" in msg
    assert "['bits', 'group_size', 'symmetric', 'include_head', 'exclude']" in msg
    with pytest.raises(lowbit.RecipeError, match="pass 'pack' has no option.*valid options: none"):
        _schedule({"passes": ["rtn", {"pack": {"bits": 4}}]}, registry)


@pytest.mark.parametrize("options,match", [
    ({"bits": 5}, "bits must be 2, 3, 4 or 8, got 5"),
    ({"group_size": 100}, "power of two >= 16 or None.*got 100"),
    ({"group_size": 8}, "power of two >= 16"),
    ({"bits": 3, "group_size": None}, "3-bit weights need a group_size"),
])
def test_bad_option_values_are_rejected_naming_the_pass(registry, options, match):
    with pytest.raises(lowbit.RecipeError, match="bad options for pass 'rtn'") as info:
        _schedule({"passes": [{"rtn": options}, "pack"]}, registry)
    assert info.match(match)


def test_act_quant_options_are_validated(registry):
    with pytest.raises(lowbit.RecipeError, match=r"activation bits must be in 2\.\.8"):
        _schedule({"passes": ["rtn", {"act_quant": {"bits": 1}}, "pack"]}, registry)


def test_both_step_spellings_give_the_same_schedule(registry):
    short = _schedule({"passes": [{"rtn": {"bits": 8, "group_size": None}}, "pack"]}, registry)
    long = _schedule({"passes": [{"pass": "rtn", "options": {"bits": 8, "group_size": None}},
                                 {"pass": "pack"}]}, registry)
    assert [(s.info.name, s.options) for s in short] == [(s.info.name, s.options) for s in long]
    assert short[0].options.bits == 8 and short[0].options.group_size is None


def test_yaml_recipe_file(tmp_path, registry):
    path = tmp_path / "my-w8.yaml"
    path.write_text("name: my-w8\n"
                    "description: per-channel int8\n"
                    "passes:\n"
                    "  - rtn: {bits: 8, group_size: null, symmetric: true, exclude: ['fc2$']}\n"
                    "  - act_quant\n"
                    "  - pack\n", encoding="utf-8")
    recipe = load_recipe(str(path), registry.presets)
    assert recipe.name == "my-w8" and recipe.description == "per-channel int8"
    assert [p.name for p in recipe.passes] == ["rtn", "act_quant", "pack"]
    rtn = schedule(recipe, registry)[0].options
    assert (rtn.bits, rtn.group_size, rtn.symmetric, rtn.exclude) == (8, None, True, ("fc2$",))
    assert load_recipe(path, registry.presets) == recipe  # a Path works too


def test_yaml_recipe_with_unknown_key_is_rejected(tmp_path, registry):
    path = tmp_path / "bad.yml"
    path.write_text("name: bad\nsteps: [rtn, pack]\n", encoding="utf-8")
    with pytest.raises(lowbit.RecipeError, match=r"\['steps'\]; valid keys"):
        load_recipe(path, registry.presets)


def test_broken_or_missing_recipe_files(tmp_path, registry):
    bad = tmp_path / "broken.yaml"
    bad.write_text("passes: [rtn, {pack\n", encoding="utf-8")
    with pytest.raises(lowbit.RecipeError, match="not valid YAML"):
        load_recipe(bad, registry.presets)
    with pytest.raises(lowbit.RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml", registry.presets)
    with pytest.raises(lowbit.RecipeError, match=r"unknown recipe 'w3a3'.*'w4a16'"):
        load_recipe("w3a3", registry.presets)


@pytest.mark.parametrize("name,bits,group_size,symmetric,passes", [
    ("w8a16", 8, 128, True, ["rtn", "pack"]),
    ("w8a8", 8, None, True, ["rotate", "rtn", "act_quant", "pack"]),
    ("w8a8-rtn", 8, None, True, ["rtn", "act_quant", "pack"]),
    ("w4a8", 4, 128, False, ["rotate", "gptq", "act_quant", "pack"]),
    ("w4a4", 4, 64, False, ["rotate", "gptq", "act_quant", "act_clip", "pack"]),
    ("w4a16-rtn", 4, 128, False, ["rtn", "pack"]),
    ("w4a16", 4, 128, False, ["rotate", "gptq", "pack"]),
    ("w3a16", 3, 128, False, ["rotate", "gptq", "pack"]),
    ("w2a16", 2, 64, False, ["rotate", "gptq", "pack"]),
    ("mixed", 4, 128, False, ["rotate", "mixed", "gptq", "pack"]),
])
def test_presets(registry, name, bits, group_size, symmetric, passes):
    recipe = load_recipe(name, registry.presets)
    assert recipe.name == name and [p.name for p in recipe.passes] == passes
    scheduled = schedule(recipe, registry)
    rtn = next(s.options for s in scheduled if s.info.name in ("rtn", "gptq"))
    assert (rtn.bits, rtn.group_size, rtn.symmetric) == (bits, group_size, symmetric)
    needs_data = any("calibration" in s.info.requires for s in scheduled)
    ctx = PassContext(calibration=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
                      if needs_data else [])
    PassManager(scheduled).check(ctx)  # the preset's order satisfies every contract


def test_preset_options_can_be_overridden(registry):
    from lowbit.compiler.recipe import override
    recipe = override(load_recipe("mixed", registry.presets), {"mixed": {"budget": 3.0}})
    assert recipe.passes[1].options["budget"] == 3.0
    with pytest.raises(lowbit.RecipeError, match=r"cannot set options of \['awq'\].*runs only"):
        override(recipe, {"awq": {"grid": 3}})
    with pytest.raises(lowbit.RecipeError, match="no option"):
        schedule(override(recipe, {"mixed": {"budgett": 3.0}}), registry)


def test_recipe_round_trips_through_dict():
    recipe = Recipe("r", (PassSpec("rtn", {"bits": 8}), PassSpec("pack")), "d")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(TypeError):
        recipe.passes[0].options["bits"] = 4  # read-only options
