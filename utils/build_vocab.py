"""Rebuild the default WordPiece vocabulary `src/lightclip/data_files/vocab.txt` from `wordfreq`.

The vocabulary is ordered so that any prefix is a valid vocabulary: special tokens, then single characters and their
`##` continuations (so every word can be spelled), then common suffixes, then English words by frequency. A tokenizer
of size V uses the first V lines. Run: `pip install wordfreq && python utils/build_vocab.py`.
"""

import argparse
import re
import string
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# multi-letter only: single letters are already among the `##` character continuations (a duplicate line would leave
# an id the tokenizer never produces, and len(tokenizer) < vocab_size)
SUFFIXES = ["ies", "es", "ed", "ing", "ly", "er", "ers", "est", "ion", "ions", "al", "ness", "ment", "ful", "less",
            "able", "ish", "ism", "ist", "ity", "ous", "ive", "ic"]


def build(size: int) -> list[str]:
    from wordfreq import top_n_list

    chars = list(string.ascii_lowercase + string.digits) + list(string.punctuation)
    vocab = SPECIALS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + ["##" + s for s in SUFFIXES]
    seen = set(vocab)
    assert len(seen) == len(vocab), "duplicate entries in the fixed part of the vocabulary"
    for word in top_n_list("en", size * 4):
        if re.fullmatch(r"[a-z]{2,}", word) and word not in seen:
            vocab.append(word)
            seen.add(word)
        if len(vocab) == size:
            break
    return vocab


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=32768)
    parser.add_argument("--out",
                        default=str(Path(__file__).resolve().parents[1] / "src/lightclip/data_files/vocab.txt"))
    args = parser.parse_args()
    vocab = build(args.size)
    Path(args.out).write_text("\n".join(vocab) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens to {args.out}")
