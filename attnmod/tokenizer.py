"""Offline CLIP tokenizers: build a ``CLIPTokenizer`` folder from a word list, no download.

A CLIP tokenizer is byte-pair encoding over ``vocab.json`` + ``merges.txt``. With a merges file
holding only its header every word splits into characters; adding one merge chain per word
(``c a t</w>`` -> ``ca t</w>`` -> ``cat</w>``) makes each listed word a single token.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import ascii_lowercase, digits

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_CHARS = ascii_lowercase + digits + ",.-'!?"


def _merge_chain(parts: list[str]) -> list[tuple[str, str]]:
    """BPE merges that join ``parts`` left to right into one token."""
    chain, left = [], parts[0]
    for right in parts[1:]:
        chain.append((left, right))
        left = left + right
    return chain


def _write(folder: Path, tokens: list[str], merges: list[tuple[str, str]], max_length: int) -> CLIPTokenizer:
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"),
        unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=max_length,
    )


def build_clip_tokenizer(folder: str | Path, words=(), max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIP tokenizer to ``folder`` whose vocabulary is every character plus ``words``.

    Each of ``words`` (lower-case letters/digits) becomes exactly one token; anything else falls back
    to characters. BPE applies the lowest-ranked merge first, so one word's chain can interrupt
    another's; a broken word gets extra merges (ranked last) joining the pieces it reached, which
    cannot disturb words already whole. Checked, not assumed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(w.lower() for w in words))
    tokens = [BOS, EOS] + list(_CHARS) + [c + "</w>" for c in _CHARS]
    merges: list[tuple[str, str]] = []

    def add(parts: list[str]) -> None:
        for pair in _merge_chain(parts):
            if pair not in merges:
                merges.append(pair)
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])

    for word in words:
        if len(word) > 1:
            add(list(word[:-1]) + [word[-1] + "</w>"])
    for _ in range(8):
        tok = _write(folder, tokens, merges, max_length)
        broken = {w: tok.tokenize(w) for w in words if len(tok.tokenize(w)) != 1}
        if not broken:
            break
        for pieces in broken.values():
            add(pieces)
    else:
        raise ValueError(f"words that do not tokenize to a single token: {sorted(broken)}")
    tok.save_pretrained(folder)
    return tok


def split_words(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """The words of a CLIP token sequence with their positions, joining the pieces BPE split a word into
    ("cyber", "punk</w>" -> ("cyberpunk", [i, i + 1])). Special tokens (``<|...|>``) are left out."""
    words, start, text = [], 0, ""
    for i, piece in enumerate(tokens):
        if piece.startswith("<|"):
            start, text = i + 1, ""
            continue
        text += piece.removesuffix("</w>")
        if piece.endswith("</w>") or i == len(tokens) - 1:
            words.append((text, list(range(start, i + 1))))
            start, text = i + 1, ""
    return words


def word_positions(tokens: list[str], word: str) -> list[int]:
    """Every token position of every occurrence of ``word`` (case-insensitive) in ``tokens``."""
    return [i for w, positions in split_words(tokens) if w == word.lower() for i in positions]
