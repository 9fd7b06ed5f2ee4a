"""Word-level tokenizers of the tiny test models (Qwen-Omni and Gemma 4 specials), used by the
adapters' `tiny()` builders and re-exported by `avprobe.testing`. Imports no adapter, so the
adapters can use them without an import loop."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from avprobe.types import OMNI_SPECIAL_TOKENS

SPECIALS = OMNI_SPECIAL_TOKENS
WORDS = (
    "[UNK] system user assistant describe what you see and hear in the video i a an . , dog siren "
    "horse bird engine drill keyboard piano rain baby crowd clock"
).split()


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[s for s in SPECIALS if s not in ("<|endoftext|>", "<|im_end|>")],
    )
    return fast


# Gemma 4's specials (ids from the config; these strings only name them in the tiny vocabulary)
GEMMA4_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|video|>",
    "<|audio>", "<audio|>", "<|audio|>",
)


@lru_cache(maxsize=1)
def tiny_gemma4_tokenizer() -> Any:
    """Word-level, with Gemma 4's specials, digits and ':' split (the frames' mm:ss stamps)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*WORDS, "model", ":", *"0123456789"]
    vocab = {w: i for i, w in enumerate(words)}
    for s in GEMMA4_SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[0-9:]"), behavior="isolated")])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=[s for s in GEMMA4_SPECIALS if s not in ("<pad>", "<bos>", "<eos>")],
    )


