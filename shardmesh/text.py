"""Text in and out, with the light `tokenizers` library (never transformers)."""

import pathlib

from tokenizers import Tokenizer

MAX_WINDOW_TEXTS = 1 << 16  # IncrementalDecoder contexts remembered per codec (about a vocabulary's worth)


class TextCodec:
    """Tokenizes prompts and turns generated ids into text pieces as they arrive."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # Texts of short id windows decoded before (IncrementalDecoder's context), by ids. A window's
        # text never changes; this saves one of the two decodes of nearly every push.
        self.window_texts: dict[tuple[int, ...], str] = {}

    @classmethod
    def from_model_dir(cls, model_dir: str | pathlib.Path) -> "TextCodec | None":
        path = pathlib.Path(model_dir) / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path))) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


class IncrementalDecoder:
    """Decodes a growing list of ids and yields only the new text, holding back an incomplete
    multi-byte character (shown as U+FFFD) until the next token completes it.

    Each push decodes a short window, not every id so far (that cost grew with the length: ~30 us
    per token at 1,000 ids, for every sequence of every step, on the router's event loop): the ids
    of the last piece given out (`given`) and those after it (`pending`). The new text is what the
    window decodes to past what `given` decodes to; both decodes start at the same id, so what a
    decoder does to the start of a string (a Metaspace decoder's leading space) cancels out. Ids that
    decode to nothing (special tokens skipped, ids the tokenizer lacks) are dropped from the window."""

    def __init__(self, codec: TextCodec | None):
        self.codec = codec
        self.given: list[int] = []    # the ids of the last piece given out: the context of the next
        self.pending: list[int] = []  # the ids after them, not given out yet

    def push(self, token_id: int) -> str:
        if self.codec is None:
            return ""
        self.pending.append(token_id)
        decode = self.codec.tokenizer.decode
        known = self.codec.window_texts
        key = tuple(self.given)
        given = known.get(key)
        if given is None:
            given = decode(self.given, skip_special_tokens=True)
            if len(known) >= MAX_WINDOW_TEXTS:
                known.clear()  # bounded; refilled from the windows in use
            known[key] = given
        text = decode(self.given + self.pending, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(given):
            return ""
        piece = text[len(given):]
        if piece:
            self.given = self.pending
        self.pending = []  # given out, or nothing to give (no context for the next piece either)
        return piece
