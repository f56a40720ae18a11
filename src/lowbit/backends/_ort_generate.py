"""Generate with this artifact using only numpy + onnxruntime (+ tokenizers for text).

    python generate.py "Once upon a time" --max-new-tokens 32
    python generate.py --ids 1 2 3 --max-new-tokens 8      # token ids in, token ids out
"""
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
past = [i for i in sess.get_inputs() if i.name.startswith("past_")]
if a.ids is None:
    from tokenizers import Tokenizer
tok = None if a.ids else Tokenizer.from_file(str(here / "tokenizer" / "tokenizer.json"))
eos = json.loads((here / "manifest.json").read_text()).get("generation", {}).get("eos_token_id")
feeds = {"input_ids": np.array([a.ids or tok.encode(a.prompt).ids], dtype=np.int64),
         **{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past}}
rng, out = np.random.default_rng(a.seed), []
while len(out) < a.max_new_tokens and (not out or out[-1] != eos):
    logits, *present = sess.run(None, feeds)          # prefill once, then one token per step
    z = logits[0, -1].astype(np.float64)
    p = np.exp((z - z.max()) / max(a.temperature, 1e-9))
    out.append(int(rng.choice(len(z), p=p / p.sum()) if a.temperature > 0 else z.argmax()))
    feeds = {"input_ids": np.array([out[-1:]], dtype=np.int64),
             **{i.name: t for i, t in zip(past, present)}}
print(" ".join(map(str, out)) if tok is None else tok.decode(out))
