"""The plugin registry: built-ins through the public hooks, failures that name the plugin."""
from __future__ import annotations

import types
from importlib import metadata

import pytest

import lowbit
from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.plugins import manager
from lowbit.plugins.hookspecs import hookimpl


class _FakeEntryPoint:
    """Stands in for an installed distribution's ``lowbit.plugins`` entry point."""

    def __init__(self, name: str, plugin: object):
        self.name, self.value, self._plugin = name, f"fake_{name}:plugin", plugin

    def load(self):
        return self._plugin


def _plugin(**hooks) -> types.ModuleType:
    """A plugin module implementing ``hooks`` (plugins must be hashable, as modules are)."""
    module = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        setattr(module, name, hookimpl(fn))
    return module


@graph_pass(name="noop_third_party", numerics="exact")
def noop_third_party(graph, ctx):
    """Does nothing."""
    return PassResult(changed=False)


@graph_pass(name="rtn", numerics="analysis")
def shadow_rtn(graph, ctx):
    """Claims the built-in pass's name."""
    return PassResult(changed=False)


@pytest.fixture
def entry_points(monkeypatch):
    """Replace the installed entry points the plugin manager sees with a given list."""
    def install(*eps):
        def fake(group):
            assert group == manager.ENTRY_POINT_GROUP
            return list(eps)
        monkeypatch.setattr(manager, "metadata", types.SimpleNamespace(entry_points=fake))
    monkeypatch.delenv("LOWBIT_DISABLE_PLUGINS", raising=False)
    return install


def test_builtin_passes_backends_and_presets(registry):
    assert {"calibrate", "rtn", "act_quant", "pack"} <= set(registry.passes)
    for name in ("calibrate", "rtn", "act_quant", "pack"):
        info = registry.passes[name]
        assert info.plugin == "lowbit.builtin" and info.name == name
    assert registry.passes["rtn"].provides == ("quantized_weights",)
    assert registry.passes["pack"].requires == ("quantized_weights",)
    assert registry.passes["calibrate"].requires == ("calibration",)
    assert registry.backends["ort"] is registry.backends["onnxruntime"]
    assert registry.backends["reference"] is registry.backends["torch"]
    assert {"w8a16", "w8a8", "w4a16"} <= set(registry.presets)
    assert "lowbit.builtin" in registry.plugins


def test_third_party_plugin_adds_a_pass(entry_points):
    entry_points(_FakeEntryPoint("good", _plugin(lowbit_passes=lambda: [noop_third_party])))
    reg = manager.build_registry()
    assert reg.passes["noop_third_party"].plugin == "good"
    assert set(reg.plugins) == {"lowbit.builtin", "good"}


def test_plugin_that_fails_to_import_is_named(entry_points):
    entry_points(metadata.EntryPoint(name="broken", value="lowbit_no_such_module_xyz:plugin",
                                     group=manager.ENTRY_POINT_GROUP))
    with pytest.raises(lowbit.PluginError) as info:
        manager.build_registry()
    msg = str(info.value)
    assert "plugin 'broken' (lowbit_no_such_module_xyz:plugin) failed to load" in msg
    assert "ModuleNotFoundError" in msg
    assert "LOWBIT_DISABLE_PLUGINS=broken" in msg and "disable_plugins=['broken']" in msg


def test_broken_plugin_can_be_disabled(entry_points, monkeypatch):
    entry_points(metadata.EntryPoint(name="broken", value="lowbit_no_such_module_xyz:plugin",
                                     group=manager.ENTRY_POINT_GROUP))
    assert "broken" not in manager.build_registry(disable=["broken"]).plugins
    monkeypatch.setenv("LOWBIT_DISABLE_PLUGINS", "other, broken")
    reg = manager.build_registry()
    assert "broken" not in reg.plugins and "rtn" in reg.passes


def test_undecorated_pass_function_is_rejected(entry_points):
    def plain(graph, ctx):
        return PassResult()
    entry_points(_FakeEntryPoint("sloppy", _plugin(lowbit_passes=lambda: [plain])))
    with pytest.raises(lowbit.PluginError, match="plugin 'sloppy' returned .*plain.*@graph_pass"):
        manager.build_registry()


def test_duplicate_pass_name_names_both_plugins(entry_points):
    entry_points(_FakeEntryPoint("shadow", _plugin(lowbit_passes=lambda: [shadow_rtn])))
    with pytest.raises(lowbit.PluginError) as info:
        manager.build_registry()
    assert "pass 'rtn' registered twice: by plugin 'lowbit.builtin' and by 'shadow'" in str(
        info.value)


def test_hook_that_raises_names_plugin_and_hook(entry_points):
    def boom():
        raise RuntimeError("no GPU here")
    entry_points(_FakeEntryPoint("flaky", _plugin(lowbit_backends=boom)))
    with pytest.raises(lowbit.PluginError,
                       match="plugin 'flaky' failed in hook lowbit_backends: RuntimeError"):
        manager.build_registry()


def test_registry_is_cached_per_disabled_set():
    assert manager.get_registry() is manager.get_registry()
    assert manager.get_registry(["not-installed"]) is not manager.get_registry()
