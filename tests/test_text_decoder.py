"""IncrementalDecoder (shardmesh/text.py) against the obvious reference: decode every id so far and
give out what is new. Same pieces, push for push, on random id sequences (special tokens mixed
in), for the decoders a checkpoint may bring: the test checkpoints' Metaspace BPE, byte-level BPE
(characters split over tokens: U+FFFD held back) and WordPiece ("##" pieces); and each push
decodes a short window, not the whole sequence."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shardmesh.checkpoint_maker import write_tokenizer
from shardmesh import text
from shardmesh.text import IncrementalDecoder, TextCodec

TEXT = ["the café serves crème brûlée, 日本語 and naïve piñatas", "don't stop: it's 3.5 km, isn't it?",
        "emoji 🙂 and ü ö ä ß; the end."] * 4


class ReferenceDecoder:
    """The whole sequence decoded at every push (what IncrementalDecoder did before it kept a window)."""

    def __init__(self, codec: TextCodec):
        self.codec, self.ids, self.emitted = codec, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.codec.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    return tokenizer


def word_piece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(TEXT, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"],
                                                                  show_progress=False))
    return tokenizer


def metaspace(tmp_path) -> Tokenizer:
    return Tokenizer.from_file(str(write_tokenizer(tmp_path, 120)))  # the test checkpoints' tokenizer


@pytest.fixture(params=["metaspace", "byte_level", "word_piece"])
def codec(request, tmp_path) -> TextCodec:
    return TextCodec({"metaspace": lambda: metaspace(tmp_path), "byte_level": byte_level,
                      "word_piece": word_piece}[request.param]())


def sequences(codec: TextCodec):
    """Random ids (special ones too, and ids the tokenizer lacks: a model's vocabulary may be larger),
    and the tokens of real text (whole characters over several tokens)."""
    size = codec.tokenizer.get_vocab_size()
    for seed in range(6):
        rng = random.Random(seed)
        yield [rng.randrange(size * (1 + seed % 2)) for _ in range(300)]
    yield codec.encode(" ".join(TEXT))


def test_the_same_pieces_as_decoding_everything(codec):
    for ids in sequences(codec):
        ours, reference = IncrementalDecoder(codec), ReferenceDecoder(codec)
        for index, token_id in enumerate(ids):
            assert ours.push(token_id) == reference.push(token_id), (index, ids[max(0, index - 4):index + 1])


def test_pieces_add_up_to_the_text(codec):
    ids = codec.encode(" ".join(TEXT))
    decoder = IncrementalDecoder(codec)
    assert "".join(decoder.push(token_id) for token_id in ids) == codec.tokenizer.decode(ids, skip_special_tokens=True)


def test_each_push_decodes_a_short_window(codec):
    lengths = []
    decode = codec.tokenizer.decode

    class Recording:
        def decode(self, ids, skip_special_tokens):
            lengths.append(len(ids))
            return decode(ids, skip_special_tokens=skip_special_tokens)

    decoder = IncrementalDecoder(codec)
    decoder.codec = TextCodec(Recording())
    rng = random.Random(0)
    ids = codec.encode(" ".join(TEXT * 3))
    ids = [i for token_id in ids for i in (token_id, *rng.choices([1, 10**6], k=rng.randrange(3)))]  # + special, unknown
    for token_id in ids:
        decoder.push(token_id)
    assert len(ids) > 400 and max(lengths) <= 24, (len(ids), max(lengths))


def test_no_tokenizer_no_text():
    assert IncrementalDecoder(None).push(5) == ""


def test_remembered_window_texts_are_exact_and_bounded(codec, monkeypatch):
    """The context texts a codec remembers (shared by every decoder of the codec) give the same
    pieces as decoding afresh, for sequences decoded one after another and interleaved, and the
    memory stays within its bound."""
    monkeypatch.setattr(text, "MAX_WINDOW_TEXTS", 8)
    codec.window_texts.clear()
    all_ids = list(sequences(codec))
    pairs = [(IncrementalDecoder(codec), ReferenceDecoder(codec)) for _ in all_ids]
    for index in range(max(map(len, all_ids))):
        for ids, (ours, reference) in zip(all_ids, pairs):
            if index < len(ids):
                assert ours.push(ids[index]) == reference.push(ids[index]), (index, ids[max(0, index - 4):index + 1])
                assert len(codec.window_texts) <= 8
