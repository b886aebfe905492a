"""What verify and the fp16 rescaling evaluate on: held-out token ids and the greedy prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import read_utf8_text

DEMO_CORPUS = Path(__file__).resolve().parents[2] / "data" / "demo_corpus.txt"


@dataclass
class FunctionalInputs:
    eval_ids: np.ndarray  # [tokens] held-out ids
    prompt_ids: np.ndarray
    source: str  # where the ids came from, for the report
    decode: object = None  # ids -> text, when there is a tokenizer


def seeded_ids(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def load_eval_ids(path: Path, vocab: int) -> np.ndarray:
    """--eval_ids: a .npy array or a text file of integers (whitespace or comma separated)."""
    path = Path(path)
    try:
        ids = np.load(path) if path.suffix == ".npy" else np.array(path.read_text().replace(",", " ").split(), dtype=np.int64)
    except (OSError, ValueError) as e:
        raise VCUError(f"{path}: not a .npy array or a text file of token ids ({e})") from None
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    if ids.size < 2 or ids.min() < 0 or ids.max() >= vocab:
        raise VCUError(f"{path}: needs at least 2 token ids, each in 0..{vocab - 1}")
    return ids


def evaluation_inputs(qdir: Path, vocab: int, text: Path | None, eval_ids: Path | None, prompt: str, eval_tokens: int) -> FunctionalInputs:
    """Held-out ids (the last `eval_tokens` of the text, or --eval_ids, or seeded ids when the
    checkpoint has no tokenizer) and the greedy prompt."""
    tokenizer = None
    # transformers 5 builds an empty tokenizer from config.json alone: only real tokenizer files count
    has_files = any((Path(qdir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if has_files and (eval_ids is None or prompt):
        try:
            from vcu128.quant.calibration import open_tokenizer

            tokenizer = open_tokenizer(qdir, ids_only=True)  # transformers' import is seconds verify need not spend
        except Exception:  # no tokenizer files, or ones transformers cannot read: evaluate on ids
            tokenizer = None
    decode = tokenizer.decode if tokenizer is not None else None
    if eval_ids is not None:
        ids, source = load_eval_ids(eval_ids, vocab), f"ids from {eval_ids}"
    elif tokenizer is not None:
        path = Path(text or DEMO_CORPUS)
        if not path.is_file():
            raise VCUError(f"--eval_text {path}: no such file")
        text_read = read_utf8_text(path, f"--eval_text {path}", "pass a UTF-8 text file")
        ids = np.asarray(tokenizer(text_read, add_special_tokens=False)["input_ids"], np.int64)
        source = f"the last tokens of {path.name}"
    else:
        ids, source = seeded_ids(vocab, eval_tokens), "seeded random ids: the checkpoint has no tokenizer"
    ids = ids[-eval_tokens:]
    if len(ids) < 2:
        raise VCUError(f"{text or eval_ids}: fewer than 2 evaluation tokens")
    prompt_ids = np.asarray(tokenizer(prompt, add_special_tokens=False)["input_ids"], np.int64) if tokenizer is not None and prompt else np.zeros(0, np.int64)
    if prompt_ids.size == 0:
        prompt_ids = ids[:4]
    return FunctionalInputs(ids.astype(np.int64), prompt_ids.astype(np.int64), source, decode)
