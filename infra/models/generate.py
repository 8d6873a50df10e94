"""Writes a vLLM model directory (config.json, tokenizer, chat template) for a Llama-shaped model of a given
size, so vLLM runs with load_format="dummy" where no weights can be downloaded."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from infra.models.spec import BOS, BUNDLED_TOKENIZER, CHAT_TEMPLATE, EOS, EOT, SHAPES, VOCAB_SIZE


def generate(out: Path, size: str = "1b", *, max_model_len: int | None = None) -> Path:
    """Writes the model directory for size (a key of SHAPES) into out and returns out."""
    if size not in SHAPES:
        raise ValueError(f"unknown model size {size!r}; available: {', '.join(SHAPES)}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = gzip.decompress(BUNDLED_TOKENIZER.read_bytes()).decode()
    vocab = json.loads(tokenizer_json)["model"]["vocab"] | {
        t["content"]: t["id"] for t in json.loads(tokenizer_json)["added_tokens"]
    }
    shape = dict(SHAPES[size])
    if max_model_len:
        shape["max_position_embeddings"] = max_model_len
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": vocab[BOS],
        "eos_token_id": [vocab[EOS], vocab[EOT]],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        **shape,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": vocab[BOS], "eos_token_id": [vocab[EOS], vocab[EOT]]}, indent=2) + "\n"
    )
    (out / "tokenizer.json").write_text(tokenizer_json)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOT,
                "pad_token": EOS,
                "add_bos_token": True,
                "clean_up_tokenization_spaces": False,
                "model_max_length": shape["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": EOS}, indent=2) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path, help="directory to write")
    p.add_argument("--size", default="1b", choices=sorted(SHAPES), help="model shape")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the shape's)")
    args = p.parse_args(argv)
    generate(args.out, args.size, max_model_len=args.max_model_len)
    print(f"wrote {args.size} model directory {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
