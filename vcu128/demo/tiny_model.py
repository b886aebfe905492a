"""A tiny Qwen2 (or ChatGLM) model and tokenizer built in-process, for the demo and the tests (no model hub).

The tokenizer is a byte-level BPE trained on the given text; the model is trained on the same text
for a fixed number of steps, so that its weights have the structure that makes GPTQ beat round-to-nearest.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from vcu128.check.inputs import DEMO_CORPUS
from vcu128.io.progress import bar

log = logging.getLogger("vcu128")

# hidden 256 = 2 groups; intermediate 640 = 5 groups (an odd count); vocab 512 splits into 16 parts;
# two heads of 128, the board's head size, so that the demo's folder gets a RoPE table.
TINY_QWEN2 = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=640,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


# The same sizes as a ChatGLM2/3 folder (remote-code names and config keys, FORMAT.md 8): two heads
# of 128 sharing one key/value group, ffn 640, RoPE on the first half of each head.
TINY_CHATGLM = dict(TINY_QWEN2, num_key_value_heads=1)
ARCHITECTURES = ("qwen2", "chatglm")


def chatglm_config(spec: dict) -> dict:
    """ChatGLM3-6B's config.json keys for a model of `spec`'s (transformers-style) sizes."""
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": spec["num_hidden_layers"], "hidden_size": spec["hidden_size"], "ffn_hidden_size": spec["intermediate_size"],
        "kv_channels": spec["hidden_size"] // spec["num_attention_heads"], "num_attention_heads": spec["num_attention_heads"],
        "multi_query_attention": True, "multi_query_group_num": spec["num_key_value_heads"], "padded_vocab_size": spec["vocab_size"],
        "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "original_rope": True,
        "seq_length": spec["max_position_embeddings"], "torch_dtype": "float16", "eos_token_id": 0, "pad_token_id": 0,
    }


def save_as_chatglm(model, spec: dict, out: Path) -> None:
    """A transformers GlmForCausalLM written as a ChatGLM2/3 folder: q/k/v joined into query_key_value,
    gate_up_proj as dense_h_to_4h, everything under transformer.* (format.family.CHATGLM)."""
    from safetensors.torch import save_file

    from vcu128.format.family import to_source_names
    from vcu128.format.model import dims_from_config

    cfg = chatglm_config(spec)
    dims = dims_from_config(cfg, out / "config.json")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tensors = to_source_names(state, dims, lambda parts, axis: torch.cat(parts, axis))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


# Fixed, so the demo model is the same on any machine, busy or idle. 100 steps (half the tests' 200,
# tests/conftest.py) keep what the demo shows: GPTQ at a third of round-to-nearest's layer error, a board
# model answering like the checkpoint (top-1 0.97, the same greedy tokens); training is most of the demo's time.
TRAIN_STEPS = 100


def build_tiny_model(out: Path, text_path: Path = DEMO_CORPUS, train_steps: int = TRAIN_STEPS, seed: int = 0,
                     progress: bool = True, architecture: str = "qwen2", **overrides) -> Path:
    """Write a trained tiny Qwen2 or ChatGLM (fp16 safetensors, config, tokenizer) into `out`: a fixed
    number of steps with a fixed seed on a fixed thread count, so the weights are the same wherever it
    runs (0 steps: the seeded random initialisation, for tests that need a model, not a good one).
    ChatGLM is trained as transformers' glm (the same architecture) and written under ChatGLM's names.
    `progress`: a bar over the training steps (vcu128.io.progress: live on a terminal, a line in a log)."""
    from transformers import GlmConfig, GlmForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: one of {', '.join(ARCHITECTURES)}")

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed count: float sums in another order would give other weights
    try:
        torch.manual_seed(seed)
        text = Path(text_path).read_text()
        spec = {**(TINY_QWEN2 if architecture == "qwen2" else TINY_CHATGLM), **overrides}
        tokenizer = train_tokenizer(text, spec["vocab_size"])
        ids = torch.tensor(tokenizer(text)["input_ids"])
        if architecture == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**spec, torch_dtype="float16"))
        else:
            model = GlmForCausalLM(GlmConfig(**spec, head_dim=spec["hidden_size"] // spec["num_attention_heads"], pad_token_id=0,
                                             rms_norm_eps=1e-5, attention_bias=True))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        seqlen, batch = 128, 8
        start = time.perf_counter()
        loss = None
        for _ in bar(range(train_steps), "training the demo model", "step", enabled=progress):
            starts = torch.randint(0, len(ids) - seqlen - 1, (batch,))
            x = torch.stack([ids[s : s + seqlen] for s in starts])
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    if loss is not None:
        log.info(f"tiny {architecture}: {train_steps} training steps in {time.perf_counter() - start:.0f} s, loss {loss.item():.2f}")
    out = Path(out)
    if architecture == "qwen2":
        model.to(torch.float16).save_pretrained(out)
    else:
        save_as_chatglm(model, spec, out)
    tokenizer.save_pretrained(out)
    (out / "demo_model.json").write_text(json.dumps({"architecture": architecture, "train_steps": train_steps, "seed": seed, "config": spec},
                                                   indent=1) + "\n")
    return out


def main(argv=None):
    from vcu128.io.errors import ArgumentParser

    p = ArgumentParser("Build the demo's tiny Qwen2 or ChatGLM (and its tokenizer), trained on the demo corpus.", prog="python -m vcu128.demo.tiny_model")
    p.add_argument("out", help="folder to write the model into")
    p.add_argument("train_steps", nargs="?", type=int, default=TRAIN_STEPS, help=f"training steps (default {TRAIN_STEPS})")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="qwen2", help="qwen2 (default) or chatglm (ChatGLM2/3's folder layout)")
    args = p.parse_args(argv)
    build_tiny_model(Path(args.out), train_steps=args.train_steps, architecture=args.architecture)


if __name__ == "__main__":  # python -m vcu128.demo.tiny_model OUT_DIR [TRAIN_STEPS]
    import sys

    from vcu128.io.errors import run_cli

    sys.exit(run_cli(main))
