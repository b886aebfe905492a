"""Calibration and evaluation text for quantize.py, with no internet.

`--calib` takes a plain text file, a JSONL file with a `text` field, or a folder saved with
datasets' `save_to_disk` (e.g. wikitext-2-raw-v1). The text is tokenized once; calibration samples
are seeded random windows of `seqlen` tokens from the first part, and the held-out tail is the
default evaluation text, so the same command always quantizes with the same samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vcu128.io.errors import VCUError
from vcu128.io.jsonfile import read_json_object, read_utf8_text

log = logging.getLogger("vcu128")

HELD_OUT_FRACTION = 0.1
MIN_ROW_CHARS = 1024  # dataset rows shorter than this are skipped, as the original workflow did


def read_texts(path: Path) -> list[str]:
    """The rows of a text file (one row), JSONL file (`text` fields) or saved HF dataset."""
    path = Path(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets comes with gptqmodel
            raise VCUError(f"{path}: reading a saved dataset needs the 'datasets' package") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for a plain folder
            raise VCUError(f"{path}: not a dataset saved with save_to_disk ({type(e).__name__}); pass a .txt or .jsonl file") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if "text" not in ds.column_names:
            raise VCUError(f"{path}: dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
        rows = [t for t in ds["text"] if len(t) >= MIN_ROW_CHARS]
        return rows or [t for t in ds["text"] if t.strip()]
    if not path.is_file():
        raise VCUError(f"{path}: no such calibration file or dataset folder")
    text = read_utf8_text(path, str(path), "calibration needs a text, JSONL or saved dataset")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)["text"]
                    if not isinstance(row, str):
                        raise TypeError
                    rows.append(row)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise VCUError(f"{path}:{i + 1}: not a JSON object with a 'text' field") from None
        return rows
    return [text]


# What a HuggingFace tokenizer is saved as (transformers 5 builds an empty tokenizer from config.json
# alone, which then tokenizes every text to nothing: only these files count).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


class SentencePieceTokenizer:
    """ChatGLM2/3's tokenizer.model read with sentencepiece itself: its remote tokenizer code is not
    run. Plain text encodes to the same ids (its special tokens are never in calibration text)."""

    eos_token = None

    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.sp.encode(text)}

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class JsonTokenizer:
    """A tokenizer.json read with the `tokenizers` library alone, which transformers' fast tokenizers
    wrap: the same ids (tests/test_quantize.py), without transformers' import (5-10 s) where
    only ids and their text are needed (verify)."""

    eos_token = None

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def open_tokenizer(model: Path, ids_only: bool = False):
    """The folder's tokenizer, never running code from the folder: a ChatGLM folder's config.json
    names remote code (auto_map), so its tokenizer.json is read directly, or its sentencepiece
    tokenizer.model. `ids_only`: a tokenizer.json is read without transformers (JsonTokenizer; not
    for quantize, whose checkpoint saves the tokenizer). Raises what transformers raises."""
    model = Path(model)
    if ids_only and (model / "tokenizer.json").is_file():
        return JsonTokenizer(model / "tokenizer.json")
    cfg = read_json_object(model / "config.json") if (model / "config.json").is_file() else {}
    if cfg.get("model_type") != "chatglm":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model))
    if (model / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        extra = read_json_object(model / "tokenizer_config.json") if (model / "tokenizer_config.json").is_file() else {}
        return PreTrainedTokenizerFast(tokenizer_file=str(model / "tokenizer.json"), eos_token=extra.get("eos_token"))
    if (model / "tokenizer.model").is_file():
        try:
            return SentencePieceTokenizer(model / "tokenizer.model")
        except ImportError:
            raise VCUError(f"{model}: ChatGLM's tokenizer.model needs the 'sentencepiece' package", "pip install sentencepiece") from None
    raise VCUError(f"{model}: no tokenizer.json or tokenizer.model")


def load_tokenizer(model: Path):
    """The model folder's tokenizer, refused by name when the folder has none or it cannot be read."""
    model = Path(model)
    if not any((model / f).is_file() for f in TOKENIZER_FILES):
        raise VCUError(f"{model}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}): calibration text cannot be tokenized",
                       "copy the model's tokenizer files into the folder (save_pretrained writes them)")
    try:
        tokenizer = open_tokenizer(model)
    except VCUError:
        raise
    except Exception as e:  # transformers raises many types here
        raise VCUError(f"{model}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if len(tokenizer) == 0 or not tokenizer("The", add_special_tokens=False)["input_ids"]:
        raise VCUError(f"{model}: its tokenizer turns text into no tokens (an empty vocabulary)")
    return tokenizer


def file_digest(path: Path) -> str:
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    sha = hashlib.sha256()
    for f in files:
        sha.update(f.read_bytes())
    return sha.hexdigest()


@dataclass
class Calibration:
    samples: list[dict]  # [{"input_ids": [..], "attention_mask": [..]}], each seqlen tokens
    eval_ids: np.ndarray  # held-out token ids for perplexity
    meta: dict  # what goes into the checkpoint so the run can be reproduced


def tokenize(tokenizer, texts: list[str]) -> np.ndarray:
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def build_calibration(
    tokenizer,
    calib: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    eval_text: str | None = None,
    vocab_size: int | None = None,
    evaluate: bool = True,
) -> Calibration:
    """The calibration samples and the held-out evaluation ids. `evaluate` False (quantize --no_report):
    no evaluation text is needed, and none is read (--calib random then needs no --eval_text). The
    samples do not depend on it."""
    rng = np.random.default_rng(seed)
    if calib == "random":
        log.warning("warning: calibrating on random tokens (--calib random): fine for a smoke test, "
                    "not for a model you will use; pass a text file for real quantization")
        if eval_text is None and evaluate:
            raise VCUError("--calib random: pass --eval_text too, there is no held-out text to evaluate on",
                           "or pass --no_report: the held-out text is for the report only")
        ids = rng.integers(0, vocab_size or len(tokenizer), (nsamples, seqlen))
        samples = [{"input_ids": row.tolist(), "attention_mask": [1] * seqlen} for row in ids]
        meta = {"calib": "random", "seed": seed, "nsamples": nsamples, "seqlen": seqlen}
        eval_ids = tokenize(tokenizer, read_texts(eval_text)) if evaluate else np.zeros(0, np.int64)
        return Calibration(samples, eval_ids, meta)
    ids = tokenize(tokenizer, read_texts(calib))
    if eval_text is None:
        cut = int(len(ids) * (1 - HELD_OUT_FRACTION))
        ids, eval_ids = ids[:cut], ids[cut:]
    else:
        eval_ids = tokenize(tokenizer, read_texts(eval_text)) if evaluate else np.zeros(0, np.int64)
    if len(ids) < seqlen + 1:
        raise VCUError(f"{calib}: too little text: {len(ids)} calibration tokens, need more than --seqlen {seqlen}"
                       + ("" if eval_text else f" after holding out {HELD_OUT_FRACTION:.0%} for evaluation"))
    if evaluate and len(eval_ids) < 2:
        raise VCUError(f"{eval_text or calib}: too little held-out text to evaluate on ({len(eval_ids)} tokens)")
    if nsamples * seqlen > 4 * len(ids):
        log.warning(f"warning: {nsamples} samples of {seqlen} tokens from {len(ids)} tokens of text: samples overlap heavily")
    starts = rng.integers(0, len(ids) - seqlen + 1, nsamples)
    samples = [{"input_ids": ids[s : s + seqlen].tolist(), "attention_mask": [1] * seqlen} for s in starts]
    meta = {
        "calib": str(Path(calib).resolve()),
        "calib_sha256": file_digest(calib),
        "calib_tokens": int(len(ids)),
        "eval_text": str(Path(eval_text).resolve()) if eval_text else f"held-out last {HELD_OUT_FRACTION:.0%} of calib",
        "eval_tokens": int(len(eval_ids)),
        "seed": seed,
        "nsamples": nsamples,
        "seqlen": seqlen,
    }
    return Calibration(samples, eval_ids, meta)
