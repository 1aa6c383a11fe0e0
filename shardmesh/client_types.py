"""What the client SDK hands to and gets from the wire: requests, `Token`, `Generation`.

Pure Python over the generated protobuf classes: no torch, no numpy (logits are decoded with the
`array` module), so a client machine needs only grpcio and protobuf.
"""

import array
import dataclasses
import sys
from collections.abc import Sequence

from shardmesh.client_errors import InvalidArgumentError, ShardmeshError
from shardmesh.v1 import router_pb2, tensor_pb2

DEFAULT_MAX_NEW_TOKENS = 16

_FINISH_REASONS = {
    router_pb2.FINISH_REASON_UNSPECIFIED: None,
    router_pb2.FINISH_REASON_LENGTH: "length",
    router_pb2.FINISH_REASON_STOP: "stop",
}


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token, as the router streamed it.

    `index` is its 0-based position among the generated tokens; `finish_reason` is None while
    generating and "length" (max_new_tokens reached) or "stop" (stop token or eos) on the last
    one; `prompt_tokens` is the length of the tokenized prompt; `logits` is the step's [vocab]
    fp32 logits when `return_logits` was asked, else None.
    """

    token_id: int
    text: str
    index: int
    finish_reason: str | None
    prompt_tokens: int
    logits: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
    """Every token of one finished generation (what `generate_all` returns)."""

    tokens: tuple[Token, ...]

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for token in self.tokens]

    @property
    def text(self) -> str:
        """The generated text (empty when the mesh has no tokenizer)."""
        return "".join(token.text for token in self.tokens)

    @property
    def finish_reason(self) -> str | None:
        return self.tokens[-1].finish_reason if self.tokens else None

    @property
    def prompt_tokens(self) -> int:
        return self.tokens[0].prompt_tokens if self.tokens else 0


def _set(message, field: str, value, name: str | None = None) -> None:
    """Assign one request field; protobuf's range/type errors become InvalidArgumentError naming it."""
    try:
        if isinstance(value, (list, tuple)):
            getattr(message, field).extend(value)
        else:
            setattr(message, field, value)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(f"{name or field}: {error}") from None


def build_request(
    prompt: Sequence[int] | str,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    return_logits: bool = False,
) -> router_pb2.GenerateRequest:
    """Build a GenerateRequest: a str prompt goes in prompt_text, a sequence of ints in prompt_token_ids.

    Only what the wire cannot carry is checked here (types, ranges of the integer fields);
    everything that depends on the model (vocab, context length) is the router's to refuse.
    """
    request = router_pb2.GenerateRequest()
    if isinstance(prompt, str):
        request.prompt_text = prompt
    elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise InvalidArgumentError(f"prompt: expected str or a sequence of int token ids, got {type(prompt).__name__}")
    else:
        _set(request, "prompt_token_ids", list(prompt), "prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens: must be an int >= 1, got {max_new_tokens!r}")
    _set(request, "max_new_tokens", max_new_tokens)
    _set(request.sampling, "temperature", temperature, "temperature")
    _set(request.sampling, "top_k", top_k, "top_k")
    if top_p is not None:
        _set(request.sampling, "top_p", top_p, "top_p")
    if seed is not None:
        _set(request.sampling, "seed", seed, "seed")
    _set(request, "stop_token_ids", list(stop_token_ids))
    request.ignore_eos = bool(ignore_eos)
    request.return_logits = bool(return_logits)
    return request


def decode_logits(tensor: tensor_pb2.Tensor) -> tuple[float, ...]:
    """Flatten an fp32 wire Tensor to a tuple of floats; a malformed one raises ShardmeshError(INTERNAL)."""
    if tensor.dtype != tensor_pb2.DTYPE_FLOAT32:
        raise ShardmeshError("INTERNAL", f"response.logits.dtype: expected DTYPE_FLOAT32, got {tensor.dtype}")
    numel = 1
    for dim in tensor.shape:
        if dim < 0:
            raise ShardmeshError("INTERNAL", f"response.logits.shape: negative dimension in {list(tensor.shape)}")
        numel *= dim
    if len(tensor.data) != 4 * numel:
        raise ShardmeshError(
            "INTERNAL", f"response.logits.data: {len(tensor.data)} bytes do not match shape {list(tensor.shape)}"
        )
    values = array.array("f", tensor.data)
    if sys.byteorder != "little":
        values.byteswap()
    return tuple(values)


def token_from_response(response: router_pb2.GenerateResponse) -> Token:
    """The SDK's view of one GenerateResponse."""
    reason = _FINISH_REASONS.get(response.finish_reason, "unknown")
    return Token(
        token_id=response.token_id,
        text=response.text,
        index=response.index,
        finish_reason=reason,
        prompt_tokens=response.prompt_tokens,
        logits=decode_logits(response.logits) if response.HasField("logits") else None,
    )
