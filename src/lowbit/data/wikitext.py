"""WikiText-2 windows exactly as ../shared/PROTOCOL.md fixes them.

Perplexity: tokenize all of test.txt once, cut non-overlapping 512-token windows, use the
first 64. Calibration: 32 windows of 512 tokens from valid.txt, from token 0, stride 512.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.errors import DataError

__all__ = ["data_dir", "token_windows", "calibration_windows", "eval_windows", "text_lines"]

_CANDIDATES = (Path(__file__).resolve().parents[3].parent / "shared" / "data" / "wikitext-2",
               Path.cwd().parent / "shared" / "data" / "wikitext-2")


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The WikiText-2 folder: ``path``, else ``$LOWBIT_DATA_DIR``, else ``../shared/data/...``."""
    given = path or os.environ.get("LOWBIT_DATA_DIR")
    d = Path(given) if given else next((c for c in _CANDIDATES if c.exists()), _CANDIDATES[0])
    if not (d / "test.txt").exists() or not (d / "valid.txt").exists():
        raise DataError(f"WikiText-2 not found in {d} (need test.txt and valid.txt). Fix: pass "
                        "data_dir=..., set LOWBIT_DATA_DIR, or give calibration data explicitly.")
    return d


def token_windows(tokenizer, split: str, n_windows: int, seq_len: int = 512,
                  path: str | os.PathLike | None = None) -> torch.Tensor:
    """``[n, seq_len]`` LongTensor of consecutive windows from the start of ``split``.txt."""
    text = (data_dir(path) / f"{split}.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_avail = ids.numel() // seq_len
    if n_windows > n_avail:
        raise DataError(f"{split}.txt gives only {n_avail} windows of {seq_len} tokens, "
                        f"{n_windows} asked")
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)


def calibration_windows(tokenizer, n: int = 32, seq_len: int = 512, path=None) -> torch.Tensor:
    return token_windows(tokenizer, "valid", n, seq_len, path)


def eval_windows(tokenizer, n: int = 64, seq_len: int = 512, path=None) -> torch.Tensor:
    return token_windows(tokenizer, "test", n, seq_len, path)


def text_lines(split: str = "test", n: int = 256, path=None) -> list[str]:
    """The first ``n`` non-empty lines of ``split``.txt (encoder-quality protocol)."""
    lines = (data_dir(path) / f"{split}.txt").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()][:n]
