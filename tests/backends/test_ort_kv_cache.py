"""ONNX Runtime artifacts with a KV cache: the graph's cache I/O, incremental decoding equal
to the full forward, generation, and the standalone ``generate.py`` run without lowbit."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.testing import assert_numerically_equal, incremental_logits, random_ids, tiny_llama

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
tokenizers = pytest.importorskip("tokenizers")


def _word_tokenizer():
    """A 128-word whitespace tokenizer for the tiny model's vocabulary (w0 .. w127)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def fp32(model):
    return lowbit.compile(model, recipe="fp32", target="onnxruntime", progress=False,
                          tokenizer=_word_tokenizer())


@pytest.fixture(scope="module")
def w4a16(model):
    """rotate (online Hadamard) + GPTQ + MatMulNBits, accuracy_level 0."""
    return lowbit.compile(model, recipe="w4a16", target="onnxruntime", progress=False,
                          calibration=random_ids(4, 32, seed=1))


@pytest.fixture(scope="module")
def saved(fp32, tmp_path_factory):
    return fp32.save(tmp_path_factory.mktemp("kv") / "artifact")


def test_onnx_graph_has_cache_inputs_and_outputs_with_a_dynamic_past(saved, fp32):
    graph = onnx.load(str(saved / "model.onnx"), load_external_data=False).graph
    cache = fp32.cache
    # the fused attention reads the cache's valid length from one more input (static cache)
    assert [i.name for i in graph.input] == ["input_ids", *cache.input_names, "cache_length"]
    assert [o.name for o in graph.output] == ["logits", *cache.output_names]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    batch, heads, past, head_dim = dims["past_key_0"]
    assert isinstance(batch, str) and isinstance(past, str) and (heads, head_dim) == (2, 16)
    assert isinstance(dims["present_value_1"][2], str)          # past + seq, symbolic
    assert dims["cache_length"] == [1]
    assert graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.INT64


@pytest.fixture(scope="module")
def fp32_unfused(model):
    """The exported graph as is (no GroupQueryAttention): any batch size for any step."""
    return lowbit.compile(model, recipe="fp32", target="onnxruntime", progress=False,
                          backend_options={"fuse": False})


@pytest.mark.parametrize("name,batch", [("fp32", 1), ("w4a16", 1), ("fp32_unfused", 2)])
def test_incremental_decode_equals_the_full_sequence_on_ort(name, batch, request, model):
    # batch 1 for the fused graphs: GroupQueryAttention takes a chunk of several tokens on a
    # non-empty cache for one row only (test_ort_fuse.py checks the clear error)
    cm = request.getfixturevalue(name)
    ids = random_ids(batch, 12, seed=9)
    full = cm(ids)
    assert_numerically_equal(incremental_logits(cm.executable, cm.cache, ids), full, rtol=1e-5,
                             what=f"{name} ORT incremental logits")
    if name.startswith("fp32"):
        assert_numerically_equal(full, model(input_ids=ids).logits.detach(), rtol=1e-5)


def test_ort_greedy_generation_matches_transformers(fp32, model):
    ids = random_ids(1, 6, seed=4)
    out = fp32.generate(ids, max_new_tokens=10, stop_at_eos=False)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.ids, expected)
    assert out.text == [" ".join(f"w{int(t)}" for t in out.new_ids[0])]


def _run_without_lowbit(script, *args) -> str:
    """Run ``script`` in an isolated interpreter where lowbit, torch and transformers cannot
    be imported (the editable install of lowbit would otherwise be found)."""
    code = ("import sys, runpy\n"
            "sys.modules.update(dict.fromkeys(['lowbit', 'torch', 'transformers']))\n"
            "try:\n    import lowbit\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('lowbit is importable')\n"
            f"sys.argv = [{str(script)!r}, *{list(args)!r}]\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          cwd=script.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_standalone_script_generates_without_lowbit(saved, fp32):
    script = saved / "generate.py"
    assert script.exists() and len(script.read_text().splitlines()) <= 40
    ids = [5, 9, 17, 3]
    expected = fp32.generate(ids, max_new_tokens=8, stop_at_eos=False).new_ids[0].tolist()
    printed = _run_without_lowbit(script, "--ids", *map(str, ids), "--max-new-tokens", "8")
    assert [int(t) for t in printed.split()] == expected
    text = _run_without_lowbit(script, "w5 w9 w17 w3", "--max-new-tokens", "8")
    assert text == " ".join(f"w{t}" for t in expected)


def test_loaded_ort_artifact_generates_the_same(saved, fp32):
    loaded = lowbit.load(saved)
    assert loaded.cache == fp32.cache
    assert torch.equal(loaded.generate([1, 2, 3], 6).ids, fp32.generate([1, 2, 3], 6).ids)


def test_cli_generate_and_the_artifact_files(saved, fp32, capsys):
    from lowbit.cli import main
    assert main(["generate", str(saved), "5 9 17 3", "--ids", "--max-new-tokens", "4"]) == 0
    expected = fp32.generate([5, 9, 17, 3], 4, stop_at_eos=False).new_ids[0].tolist()
    assert capsys.readouterr().out.split() == [str(t) for t in expected]
    manifest = lowbit.load(saved).manifest
    assert "generate.py" in manifest["files"]        # listed, but not counted as model bytes
    assert manifest["figures"]["artifact_bytes"] == (saved / "model.onnx").stat().st_size


def test_static_cache_decoder_extends_its_buffers_in_place(fp32):
    """The cache stays in fixed buffers (present bound to past): logits equal the full forward
    and the exactly-sized past/present path, the buffers grow on overflow, rewind replays."""
    ids = random_ids(1, 12, seed=5)
    full = fp32(ids)
    dec = fp32.executable.cached_decoder(batch=1, capacity=9)
    first = dec._arrays["past_key_0"]
    chunks = [dec(ids[:, :8]), dec(ids[:, 8:9])]
    assert dec._arrays["past_key_0"] is first and dec.length == 9     # written in place
    chunks.append(dec(ids[:, 9:12]))                                   # 12 > 9: grows
    assert dec.capacity == 18 and dec.length == 12
    assert_numerically_equal(torch.cat(chunks, dim=1), full, rtol=1e-5, what="in-place cache")
    plain = incremental_logits(fp32.executable, fp32.cache, ids)
    assert_numerically_equal(torch.cat(chunks, dim=1), plain, rtol=1e-5, what="vs past/present")
    _, *present = fp32.executable({"input_ids": ids, **fp32.cache.empty(1)})
    for name, want in zip(fp32.cache.input_names, present):
        assert_numerically_equal(dec.past()[name], want, rtol=1e-5, what=name)
    dec.rewind(11)
    assert_numerically_equal(dec(ids[:, 11:12]), full[:, 11:12], rtol=1e-5, what="rewound")
    with pytest.raises(lowbit.UsageError, match="rewind to 0..12"):
        dec.rewind(13)


def test_static_cache_decoder_batch_and_its_errors(fp32):
    ids = random_ids(2, 6, seed=6)
    dec = fp32.executable.cached_decoder(batch=2, capacity=6)
    got = torch.cat([dec(ids[:, :5]), dec(ids[:, 5:])], dim=1)
    assert_numerically_equal(got, fp32(ids), rtol=1e-5, what="batch 2 in place")
    with pytest.raises(lowbit.UsageError, match=r"batch size 1 only .* Fix"):
        dec(ids[:, :2])                  # a chunk on a non-empty cache: one row only (GQA)
    with pytest.raises(lowbit.UsageError, match=r"batch=2"):
        dec(ids[:1, :1])


def test_generation_uses_the_in_place_cache_and_agrees_with_the_copying_path(fp32):
    from lowbit.generation import generate_ids
    ids = random_ids(2, 5, seed=8)
    calls = []
    exe = fp32.executable

    class Copying:                       # the executable without its in-place decoder
        def __call__(self, inputs):
            calls.append(inputs["input_ids"].shape[1])
            return exe(inputs)
    in_place = generate_ids(exe, ids, 9, fp32.cache)
    copying = generate_ids(Copying(), ids, 9, fp32.cache)
    assert calls == [5] + [1] * 8 and torch.equal(in_place.ids, copying.ids)


def test_unfused_artifact_generates_but_ships_no_script(fp32_unfused, tmp_path):
    assert fp32_unfused.executable.cached_decoder(1, 8) is None      # no cache_length input
    assert fp32_unfused.generate([1, 2, 3], 4).ids.shape == (1, 7)
    with pytest.warns(UserWarning, match="generate.py is not shipped.*fuse"):
        out = fp32_unfused.save(tmp_path / "unfused")
    assert not (out / "generate.py").exists()


def test_decode_latency_steps_like_generate(fp32, fp32_unfused, monkeypatch):
    """``lowbit bench`` / the main job time a decode step the way generate() takes it."""
    from lowbit.backends.onnxruntime import StaticCacheDecoder
    from lowbit.job import decode_latency
    steps = []
    real = StaticCacheDecoder.__call__
    monkeypatch.setattr(StaticCacheDecoder, "__call__",
                        lambda self, ids: steps.append(ids.shape[1]) or real(self, ids))
    assert decode_latency(fp32, 128, context=16, runs=5) > 0
    assert steps[0] == 16 and set(steps[1:]) == {1} and len(steps) >= 1 + 5   # in place
    steps.clear()
    assert decode_latency(fp32_unfused, 128, context=16, runs=5) > 0           # copying
    assert steps == []
