"""Generate with this artifact using only numpy + onnxruntime (+ tokenizers for text):
``python generate.py "Once upon a time" --max-new-tokens 32``, or ``--ids 1 2 3`` (ids in/out)."""
import argparse, json, pathlib  # noqa: E401  (shipped next to model.onnx; lowbit not needed)

import numpy as np
import onnxruntime as ort

here = pathlib.Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("prompt", nargs="?")
ap.add_argument("--ids", type=int, nargs="+")
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--temperature", type=float, default=0.0)    # 0: greedy
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--threads", type=int, default=0)            # 0: ONNX Runtime's default
a = ap.parse_args()
so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
sess = ort.InferenceSession(str(here / "model.onnx"), so, providers=["CPUExecutionProvider"])
tok = None if a.ids else __import__("tokenizers").Tokenizer.from_file(
    str(here / "tokenizer" / "tokenizer.json"))                   # tokenizers: for text only
eos = json.loads((here / "manifest.json").read_text()).get("generation", {}).get("eos_token_id")
ids = np.array([a.ids or tok.encode(a.prompt).ids], dtype=np.int64)
rng, out, n, cap = np.random.default_rng(a.seed), [], 0, ids.shape[1] + a.max_new_tokens
cache = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, i.shape[1], cap, i.shape[3]),
         np.float32)) for i in sess.get_inputs() if i.name.startswith("past_")}  # whole run
while len(out) < a.max_new_tokens and (not out or out[-1] != eos):
    bind = sess.io_binding()                          # prefill once, then one token per step
    bind.bind_cpu_input("input_ids", ids)
    bind.bind_cpu_input("cache_length", np.array([n], np.int64))    # valid cache positions
    bind.bind_output("logits", "cpu")
    for name, buffer in cache.items():      # each present_* is the past_* buffer, appended to
        bind.bind_ortvalue_input(name, buffer)
        bind.bind_ortvalue_output(name.replace("past_", "present_"), buffer)
    sess.run_with_iobinding(bind)
    z, n = bind.get_outputs()[0].numpy()[0, -1].astype(np.float64), n + ids.shape[1]
    p = np.exp((z - z.max()) / max(a.temperature, 1e-9))
    out.append(int(rng.choice(len(z), p=p / p.sum()) if a.temperature > 0 else z.argmax()))
    ids = np.array([out[-1:]], dtype=np.int64)
print(" ".join(map(str, out)) if tok is None else tok.decode(out))
