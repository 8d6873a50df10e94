"""Trains the fleet's bundled byte-level BPE tokenizer (run by hand; its output is committed)."""

from __future__ import annotations

import argparse
import gzip
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from infra.models.spec import BUNDLED_TOKENIZER, SPECIAL_TOKENS, VOCAB_SIZE

# Training is deterministic for a given corpus and tokenizers version, but the corpus (the standard library's
# sources) differs between Python versions, so the result is committed rather than rebuilt at set-up.


def corpus(limit_bytes: int) -> list[str]:
    """The interpreter's standard-library sources in sorted order, up to limit_bytes: English prose in
    docstrings and comments plus code, which is what prompts to a coding assistant look like."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size >= limit_bytes:
            break
    return texts


def train(limit_bytes: int) -> Tokenizer:
    """A byte-level BPE tokenizer with VOCAB_SIZE entries, the special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(corpus(limit_bytes), trainer=trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=BUNDLED_TOKENIZER, help="gzipped tokenizer.json to write")
    p.add_argument("--corpus-mb", type=float, default=24.0, help="standard-library text to train on")
    args = p.parse_args(argv)
    tok = train(int(args.corpus_mb * 1e6))
    if tok.get_vocab_size() != VOCAB_SIZE:
        print(f"corpus too small: vocab {tok.get_vocab_size()} < {VOCAB_SIZE}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:
        f.write(tok.to_str().encode())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
