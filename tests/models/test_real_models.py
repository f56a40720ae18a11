"""Real weights (SmolLM2-135M, all-MiniLM-L6-v2), fetched by scripts/setup.sh.

Quality figures come from bench/quality.py on 64 windows; these tests check the same
pipeline on a few windows with bounds that a broken quantizer or backend would fail.
"""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.compiler.capture import capture
from lowbit.data.wikitext import eval_windows
from lowbit.eval import embedding_similarity, perplexity

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    base = capture("smollm2")
    windows = eval_windows(base.tokenizer, 4)
    fp32 = perplexity(lambda x: base.graph.run({"input_ids": x})[0], None, windows=windows,
                      progress=False)["ppl"]
    return base, windows, fp32


def test_smollm2_captures_with_structural_head(smollm2):
    base, _, fp32 = smollm2
    sites = base.graph.linears()
    assert len(sites) == 30 * 7 + 1
    assert sites[-1].name == "lm_head" and sites[-1].out_features == 49152
    assert 15 < fp32 < 40  # per-window ppl of a working 135M model (26.15 on 64 windows)


@pytest.fixture(scope="module")
def w4a16(smollm2):
    """The w4a16 preset (rotation + GPTQ, calibrated on WikiText-2 valid) compiled once for the
    torch reference backend, then the same quantized graph lowered for ONNX Runtime."""
    # 16 of the preset's 32 calibration windows keep CI fast; quality is measured in bench/
    ref = lowbit.compile("smollm2", recipe="w4a16", target="torch", progress=False,
                         calibration_samples=16)
    return ref, lowbit.relower(ref, "onnxruntime")


def test_smollm2_w4a16_preset_rotates_and_beats_rtn(smollm2, w4a16):
    _, windows, fp32 = smollm2
    ref, ort = w4a16
    passes = {p["name"]: p for p in ref.manifest["passes"]}
    assert passes["rotate"]["verification"]["max_rel_error"] < 1e-4     # exact on 30 layers
    assert passes["rotate"]["metrics"]["rotation"] == "kronecker(72 x 8)"
    assert ort.figures["backend_max_rel_error_vs_torch"] < 1e-3
    p_ref = perplexity(ref, None, windows=windows, progress=False)["ppl"]
    p_ort = perplexity(ort, None, windows=windows, progress=False)["ppl"]
    assert abs(p_ort / p_ref - 1) < 0.005           # the backends agree to 0.5%
    # 64 windows: fp32 26.15, RTN 33.05 (1.26x), this preset 28.0 (1.07x); 4 windows here
    assert fp32 * 0.99 < p_ref < fp32 * 1.15


def test_smollm2_onnxruntime_artifact_reloads(smollm2, w4a16, tmp_path):
    _, windows, _ = smollm2
    ort = w4a16[1]
    ort.save(tmp_path / "a")
    size = sum(p.stat().st_size for p in (tmp_path / "a").iterdir() if p.is_file())
    # int4 g128 linears + the float embedding (tied head) stay far below fp32's 538 MB
    assert size < 300e6
    again = lowbit.load(tmp_path / "a")
    ids = windows[:1, :64]
    assert torch.equal(again(ids), ort(ids))


def test_minilm_w8a8_embeddings_close_to_fp32():
    torch.set_num_threads(2)
    base = capture("minilm")
    cm = lowbit.compile("minilm", recipe="w8a8", target="torch", progress=False)
    ref = lambda ids, mask: base.graph.run({"input_ids": ids, "attention_mask": mask})[0]  # noqa
    sim = embedding_similarity(cm, ref, base.tokenizer, n_lines=64, progress=False)
    assert sim["cosine"] >= 0.99
