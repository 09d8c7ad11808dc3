"""The tokenizer a GGUF file carries (``tokenizer.*`` metadata, as llama.cpp reads it).

When the model came from a GGUF (the bundled SmolLM2, a ``.gguf`` source, or a folder compressed
from one), every ``tokenizer.*`` field is copied from that file: it holds what a round trip through
transformers loses (llama.cpp's pre-tokenizer name, e.g. SmolLM's digit split, the flags for
BOS/EOS, the chat template). Otherwise the folder's ``tokenizer.json`` is written as llama.cpp's
converter writes a byte-level BPE tokenizer (``get_vocab_base`` in ``convert_hf_to_gguf.py``):
every id up to the embedding rows, padding ids as unused ``[PAD<i>]`` tokens, added special tokens
as control tokens, the merges, and the special ids and chat template through gguf-py's
``SpecialVocab``. The pre-tokenizer is named by the split it performs; one llama.cpp does not name
is refused in one line, as are SentencePiece-style tokenizers (their scores are not in
``tokenizer.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter, SpecialVocab, TokenType
from tokenizers import Tokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from mka_core.errors import MkaInputError

# llama.cpp's name for each split regex transformers' GGUF reader also knows (the same patterns
# Llama-3, Qwen2, GPT-4o and Tekken tokenizers ship in tokenizer.json)
_SPLIT_NAMES = ("llama-bpe", "qwen2", "gpt-4o", "tekken")


@dataclass(frozen=True)
class Vocab:
    """The tokenizer metadata of one export, checked, ready to be written."""

    origin: str  # where it comes from: "<file>.gguf" or "tokenizer.json"
    n_tokens: int
    write: Callable[[GGUFWriter], None]


def vocab_for(folder: Path, origin_gguf: Path | None, n_vocab: int) -> Vocab:
    """The tokenizer of a model folder whose embeddings have `n_vocab` rows: copied from the GGUF
    it came from when that file has as many tokens, else built from its ``tokenizer.json``."""
    if origin_gguf is not None:
        copied = _copied(origin_gguf, n_vocab)
        if copied is not None:
            return copied
    return _from_tokenizer_json(folder, n_vocab)


def _copied(path: Path, n_vocab: int) -> Vocab | None:
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged source file: one clear line
        raise MkaInputError(f"cannot read the tokenizer of {path.name}: {str(e)[:120]}") from None
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        return None  # another vocabulary than the model's: fall back to its tokenizer.json
    entries = []
    for key, field in fields.items():
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        entries.append((key, field.contents(), vtype, sub))

    def write(w: GGUFWriter) -> None:
        for key, value, vtype, sub in entries:
            w.add_key_value(key, value, vtype, sub_type=sub)

    return Vocab(path.name, n_vocab, write)


def _pre_name(pre) -> str | None:
    """llama.cpp's name of a tokenizer.json pre-tokenizer, or None."""

    def byte_level(p, regex: bool) -> bool:
        return (
            isinstance(p, dict)
            and p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", False)
            and bool(p.get("use_regex", True)) == regex
        )

    if byte_level(pre, True):
        return "gpt-2"
    steps = (
        pre.get("pretokenizers")
        if isinstance(pre, dict) and pre.get("type") == "Sequence"
        else None
    )
    if not steps or len(steps) != 2:
        return None
    first, second = steps
    if (
        first.get("type") == "Digits"
        and first.get("individual_digits")
        and byte_level(second, True)
    ):
        return "smollm"  # digits one by one, then GPT-2's split (llama.cpp's SmolLM / StarCoder)
    if first.get("type") == "Split" and byte_level(second, False):
        pattern = (first.get("pattern") or {}).get("Regex")
        if first.get("behavior") == "Isolated" and not first.get("invert", False):
            for name in _SPLIT_NAMES:
                if GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern:
                    return name
    return None


def _from_tokenizer_json(folder: Path, n_vocab: int) -> Vocab:
    path = folder / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
        vocab: dict[str, int] = model["vocab"]
    except FileNotFoundError:
        raise MkaInputError(f"{folder} has no tokenizer.json to write into the GGUF") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MkaInputError(f"{path} is not a readable tokenizer.json ({e})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MkaInputError(
            f"{path}: a {model.get('type')} tokenizer"
            f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''} "
            f"is not written to GGUF from tokenizer.json (its scores are not there); GGUF export "
            f"writes byte-level BPE tokenizers, or copies the tokenizer of the GGUF a model came from"
        )
    pre = _pre_name(tj.get("pre_tokenizer"))
    if pre is None:
        raise MkaInputError(
            f"{path}: its pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:120]} is not one "
            f"llama.cpp names (GPT-2, SmolLM digits, Llama-3, Qwen2, GPT-4o or Tekken splits)"
        )
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise MkaInputError(
            f"{path}: normalizer {normalizer.get('type')} is not applied by llama.cpp"
        )
    by_id = {int(i): t for t, i in vocab.items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= n_vocab:
        raise MkaInputError(
            f"{path} has token ids up to {max(by_id)} but the model's embeddings have only "
            f"{n_vocab} rows"
        )
    tokens, types = [], []
    for i in range(n_vocab):  # llama.cpp needs a token per embedding row
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    special = SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise MkaInputError(f"{path} holds no BPE merges")
    # whether the tokenizer adds BOS / EOS, as its post-processor does it (not as configs claim)
    tok = Tokenizer.from_file(str(path))
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    ids = special.special_token_ids
    special.add_special_token["bos"] = len(full) > len(plain) and full[0] == ids.get("bos", -1)
    special.add_special_token["eos"] = len(full) > len(plain) and full[-1] == ids.get("eos", -1)

    def write(w: GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)

    return Vocab("tokenizer.json", n_vocab, write)
