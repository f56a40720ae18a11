"""Prepare everything ``bench/gpu_check.py`` needs on a GPU machine that has no TVM compiler.

On this (CPU) machine: the CUDA artifact and its torch-reference twin come from
``bench/tvm_cuda_build.py``; this script adds

- ``kernels/``: one CUDA library per distinct quantized linear of the artifact (and the
  4096 x 4096 int4 layer of issue 5's bench), built for ``--arch`` with the same emitter and
  dlight schedules as whole models, exported with ``export_library``; ``kernels.json`` their specs;
- ``reference.safetensors`` / ``reference.json``: the PROTOCOL's evaluation windows, logits of the
  torch reference backend on the first ``--logit-tokens`` tokens of window 0, and the reference
  perplexity on the same windows (computed here, so the GPU run only has to compare);
- the CUDA artifact, copied (``artifact/``).

The GPU machine then needs only lowbit's source, torch and a runtime-only TVM (``libtvm_runtime``
plus its CUDA module; no ``libtvm_compiler``), see ``bench/gpu_check.py``.

    PYTHONPATH=src .venv/bin/python bench/tvm_cuda_build.py --recipe w4a16 --out /tmp/gpu/smollm2
    PYTHONPATH=src .venv/bin/python bench/gpu_bundle.py --build /tmp/gpu/smollm2 --out /tmp/gpu/bundle
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lowbit
from lowbit.backends.tvm.kernels import QuantLinearSpec
from lowbit.backends.tvm.testing import quant_linear_library
from lowbit.data.wikitext import eval_windows
from lowbit.eval import perplexity


def layer_specs(manifest: dict) -> dict[str, QuantLinearSpec]:
    """Distinct kernels of an artifact's quantized linears, by kernel name."""
    specs = {}
    for layer in manifest["layers"].values():
        spec = QuantLinearSpec(layer["out_features"], layer["in_features"], layer["bits"],
                               layer["group_size"], not layer["symmetric"], False,
                               layer.get("act_bits") or 0, layer.get("act_clip") or 1.0)
        specs[spec.name] = spec
    return specs


def build_kernels(specs: dict[str, QuantLinearSpec], arch: str, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, spec in specs.items():
        t = time.perf_counter()
        library = quant_linear_library(spec, {"kind": "cuda", "arch": arch})
        library.export_library(str(out / f"{name}.so"))
        rows.append({"name": name, "file": f"{name}.so", "out_features": spec.out_features,
                     "in_features": spec.in_features, "bits": spec.bits,
                     "group_size": spec.group_size, "zero_points": spec.has_zero_points,
                     "act_bits": spec.act_bits, "act_clip": spec.act_clip,
                     "build_s": round(time.perf_counter() - t, 1)})
        print(f"kernel {name}: {rows[-1]['build_s']} s", flush=True)
    return rows


# tiny random models for cuda: plain fp32, int4 RTN (partial last group), rotation with
# online Hadamards and int8 activations, and SmolLM2's widths (Hadamards 72x8, 48x32) with
# rotation + int4 RTN, each beside its torch-reference logits
ROTATED_RTN = {"name": "w4a16-rotate-rtn", "passes": [
    "rotate", {"rtn": {"bits": 4, "group_size": 128, "symmetric": False}}, "pack"]}
SMOLLM2_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=512)
TINY = {"llama-fp32": ({"intermediate_size": 192}, "fp32"),
        "llama-w4a16-rtn": ({"intermediate_size": 192}, "w4a16-rtn"),
        "llama-w8a8": ({"intermediate_size": 192}, "w8a8"),
        "smollm2-widths-rotate-rtn": (SMOLLM2_WIDTHS, ROTATED_RTN)}


def build_tiny(out: Path, arch: str) -> None:
    from lowbit.testing import random_ids, tiny_llama
    for name, (cfg, recipe) in TINY.items():
        ref = lowbit.compile(tiny_llama(**cfg), recipe=recipe, target="torch", progress=False,
                             kv_cache=False)
        cm = lowbit.relower(ref, "cuda", {"arch": arch})
        d = out / "tiny" / name
        cm.save(d / "artifact", overwrite=True)
        tensors = {}
        vocab = cfg.get("vocab_size", 128)
        for i, (b, t) in enumerate(((2, 17), (1, 1), (1, 64))):
            ids = random_ids(b, t, seed=40 + i, vocab=vocab)
            tensors[f"ids{i}"] = ids
            tensors[f"logits{i}"] = ref(ids).float().contiguous()
        save_file(tensors, str(d / "reference.safetensors"))
        print(f"tiny {name}: built", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True, help="--out of bench/tvm_cuda_build.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--logit-tokens", type=int, default=32)
    ap.add_argument("--tiny-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    build, out = Path(a.build), Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_tiny(out, a.arch)
    if a.tiny_only:
        return
    manifest = json.loads((build / "cuda" / "manifest.json").read_text())
    specs = layer_specs(manifest)
    big = QuantLinearSpec(4096, 4096, 4, 128, True, False)
    specs.setdefault(big.name, big)
    kernels = build_kernels(specs, a.arch, out / "kernels")
    (out / "kernels.json").write_text(json.dumps(kernels, indent=1))

    ref = lowbit.load(build / "torch")
    windows = eval_windows(ref.tokenizer, a.windows)
    probe = windows[:1, : a.logit_tokens]
    short = windows[:1, :5]          # 5 rows: the CUDA backend's decode-sized kernel path
    with torch.no_grad():
        logits, short_logits = ref(probe).float(), ref(short).float()
    ppl = perplexity(ref, None, windows=windows, progress=True)
    save_file({"windows": windows.to(torch.int32).contiguous(), "probe": probe.contiguous(),
               "logits": logits.contiguous(), "probe_short": short.contiguous(),
               "logits_short": short_logits.contiguous()}, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps(
        {"recipe": manifest["recipe"]["name"], "backend": "torch", "perplexity": ppl,
         "threads": torch.get_num_threads()}, indent=1))
    shutil.copytree(build / "cuda", out / "artifact")
    print(json.dumps({"kernels": len(kernels), "perplexity_torch": ppl["ppl"],
                      "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}))


if __name__ == "__main__":
    main()
