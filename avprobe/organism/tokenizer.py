"""Word-level tokenizer of the organism world, with the Qwen-Omni special tokens.

Every word of the world (chat roles, query words, caption words, the 12 source names) is
one token, so a concept is one token and the logit lens reads it directly. The special
tokens are those Qwen2.5-Omni uses, so the adapters' prompt layout works unchanged.
"""

from __future__ import annotations

from avprobe.organism.world import QUERIES, SOURCES
from avprobe.types import OMNI_SPECIAL_TOKENS

SPECIAL_TOKENS = OMNI_SPECIAL_TOKENS
UNK = "[UNK]"

# ChatML, as Qwen uses it. Content may be a string or Qwen-style parts
# ({"type": "text"|"audio"|"video"|"image", ...}); media parts become their placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vocabulary() -> list[str]:
    """All tokens in id order: specials, [UNK], chat roles, query and caption words, names."""
    words: list[str] = ["system", "user", "assistant"]
    for text in (*QUERIES, "i see a . i hear a ."):
        for w in text.split():
            if w not in words:
                words.append(w)
    words.extend(SOURCES)
    return [*SPECIAL_TOKENS, UNK, *words]


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over `vocabulary()`; save it with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder with an impossible prefix joins tokens with single spaces.
    core.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="left",
    )
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    """The config fields of the Qwen classes that must point at this tokenizer's ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "audio_token_id": ids["<|AUDIO|>"],
        "video_token_id": ids["<|VIDEO|>"],
        "image_token_id": ids["<|IMAGE|>"],
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
        "user_token_id": tokenizer.convert_tokens_to_ids("user"),
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],
    }
