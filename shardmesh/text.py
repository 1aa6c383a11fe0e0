"""Text in and out, with the light `tokenizers` library (never transformers)."""

import pathlib

from tokenizers import Tokenizer


class TextCodec:
    """Tokenizes prompts and turns generated ids into text pieces as they arrive."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: str | pathlib.Path) -> "TextCodec | None":
        path = pathlib.Path(model_dir) / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path))) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


class IncrementalDecoder:
    """Decodes a growing list of ids and yields only the new text, holding back an incomplete
    multi-byte character (shown as U+FFFD) until the next token completes it."""

    def __init__(self, codec: TextCodec | None):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        if self.codec is None:
            return ""
        self.ids.append(token_id)
        text = self.codec.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece
