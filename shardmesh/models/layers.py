"""Layers shared by every family: RMSNorm, rotary embeddings, GQA attention over a KV cache, SwiGLU MLP.

Plain tensors, no autograd and no nn.Module: weights are loaded by their names on disk through a
`CheckpointReader` and never require grad. Every layer runs on the whole packed batch of a step
(all sequences' new tokens one after another); only attention loops over sequences, each against
its own cache.

Shape legend:
    N: new tokens in the step (all sequences packed)   H: hidden_size
    n: new tokens of one sequence                      L: cached + new tokens of one sequence
    A: attention heads   G: key/value heads   D: head_dim   I: intermediate_size
"""

import array
import dataclasses
import typing

import numpy
import torch
import torch.nn.functional as F

from shardmesh import huge_pages, kernels
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.models.parallel import QKVParallelLinear, RowParallelLinear
from shardmesh.tp_group import SINGLE, TPGroup


@dataclasses.dataclass(frozen=True)
class Segment:
    """Where one sequence's new tokens sit in the packed batch, and where they go in its cache."""

    offset: int          # first row of this sequence in the packed [N, ...] tensors
    start_position: int  # tokens already cached = position of the first new token
    num_tokens: int


class LayerCache(typing.NamedTuple):
    """One sequence's KV cache of one layer, as views made once per step by `layer_caches`."""

    new_slots: torch.Tensor  # [2, G, n, D]: where this step's new keys and values go
    keys: torch.Tensor       # [1, G, L, D]: the cached and new keys attention reads (L = start_position + n)
    values: torch.Tensor     # [1, G, L, D]


def layer_caches(buffer: torch.Tensor, segment: Segment) -> list[LayerCache]:
    """buffer [layers, 2, G, capacity, D], one sequence's cache of every layer of a stage -> a
    LayerCache per layer for this step: a few view ops per sequence and step instead of per layer."""
    end = segment.start_position + segment.num_tokens
    new_slots = buffer[:, :, :, segment.start_position:end].unbind(0)  # layers x [2, G, n, D]
    cached = buffer[:, :, None, :, :end].unbind(0)                    # layers x [2, 1, G, L, D]
    return [LayerCache(slots, *keys_values.unbind(0)) for slots, keys_values in zip(new_slots, cached)]


class RMSNorm:
    """x / rms(x) * weight, the mean of squares taken in float32 as in transformers."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight = weight  # [H]
        self.eps = eps

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        if input_dtype == torch.float32:  # torch's fused kernel: the same sums here (bit-identical), fewer ops
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.eps)
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding:
    """Default RoPE (no scaling): cos/sin of position * theta^(-2i/D), the halves concatenated.
    The sin it returns has its first half negated (`apply_rotary` then needs no negation)."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu"):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        self.inv_freq = 1.0 / (theta ** exponents)  # [D/2]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int64 [N] -> (cos, signed_sin), each [N, D] in `dtype`: signed_sin is sin with
        its first half negated."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [N, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)                   # [N, D]
        signed_sin = angles.sin()
        signed_sin[:, :freqs.shape[1]].neg_()
        return angles.cos().to(dtype), signed_sin.to(dtype)


class RotaryTable:
    """RotaryEmbedding's (cos, signed_sin) rows looked up by position: computed once per position, in
    chunks of CHUNK positions by RotaryEmbedding itself (the same elementwise ops on the same values,
    so the same bits), then gathered per step with one index_select each instead of ~8 small ops."""

    CHUNK = 64  # positions computed at once (x D elements: well under torch's parallel grain, no tail)

    def __init__(self, rotary: RotaryEmbedding, dtype: torch.dtype):
        self.rotary, self.dtype = rotary, dtype
        device = rotary.inv_freq.device
        width = 2 * rotary.inv_freq.shape[0]
        self.cos = torch.empty(0, width, dtype=dtype, device=device)         # [P, D]: rows of positions [0, P)
        self.signed_sin = torch.empty(0, width, dtype=dtype, device=device)  # [P, D]
        self._host: tuple | None = None  # (cos, signed_sin) as numpy views, on the CPU in float32 (rows_at)

    def __call__(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int64 [N], each < end -> (cos, signed_sin) [N, D] each, contiguous, as
        RotaryEmbedding(positions, dtype) gives them."""
        if end > self.cos.shape[0]:
            self._grow(end)
        return self.cos.index_select(0, positions), self.signed_sin.index_select(0, positions)

    def covering(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed_sin) [P, D] each, contiguous, row p of position p, for every position < end <= P:
        the tables themselves (a kernel that reads its rows by position: models/decode_layer.py)."""
        if end > self.cos.shape[0]:
            self._grow(end)
        return self.cos, self.signed_sin

    def rows_at(self, positions: array.array, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As __call__ for positions given as an int64 array ('q'). On the CPU in float32 by numpy
        gathers (take): the same rows copied, at a fraction of index_select's cost on the cold
        caches a decode step starts on; elsewhere by __call__."""
        if end > self.cos.shape[0]:
            self._grow(end)
        if self._host is None:
            return self(torch.frombuffer(positions, dtype=torch.int64).to(self.cos.device), end)
        cos, signed_sin = self._host
        indices = numpy.frombuffer(positions, dtype=numpy.int64)  # [N]
        return torch.from_numpy(cos.take(indices, 0)), torch.from_numpy(signed_sin.take(indices, 0))

    def _grow(self, end: int) -> None:
        start, stop = self.cos.shape[0], -(-end // self.CHUNK) * self.CHUNK
        device = self.cos.device
        chunks = [self.rotary(torch.arange(first, first + self.CHUNK, device=device), self.dtype)
                  for first in range(start, stop, self.CHUNK)]
        self.cos = torch.cat([self.cos, *(cos for cos, _ in chunks)])
        self.signed_sin = torch.cat([self.signed_sin, *(sin for _, sin in chunks)])
        if device.type == "cpu" and self.dtype == torch.float32:
            self._host = (self.cos.numpy(), self.signed_sin.numpy())  # views of the grown tables


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """states [N, heads, D] rotated by cos/signed_sin [N, D] (`RotaryEmbedding`), the rotate-half
    convention of transformers: states * cos + cat(-second, first) * sin, where cat(second, first)
    is a roll by D/2 and the minus sits in signed_sin (negation is exact: the same products)."""
    return states * cos[:, None, :] + states.roll(states.shape[-1] // 2, dims=-1) * signed_sin[:, None, :]


class Attention:
    """Grouped-query self-attention; each sequence attends to its cache plus its new tokens, causally.

    With tensor parallelism (`group` of T ranks) it holds this rank's heads only (A, G below are
    then the rank's counts) and its cache holds their keys/values; o_proj sums the ranks' outputs."""

    def __init__(self, config: ModelConfig, qkv_proj: QKVParallelLinear, o_proj: RowParallelLinear):
        self.num_heads = qkv_proj.heads.num_heads
        self.num_kv_heads = qkv_proj.heads.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = config.head_dim ** -0.5
        self.qkv_proj = qkv_proj  # weight [(A + 2G) * D, H]
        self.o_proj = o_proj      # weight [H, A * D]

    @classmethod
    def load(cls, config: ModelConfig, reader: CheckpointReader, prefix: str, dtype: torch.dtype,
             group: TPGroup = SINGLE) -> "Attention":
        """Reads `{prefix}{q,k,v,o}_proj.weight` (this rank's heads of each)."""
        qkv_proj = QKVParallelLinear.load_heads(reader, prefix, config, group, dtype)
        heads, D = qkv_proj.heads, config.head_dim
        columns = (heads.first_head * D, (heads.first_head + heads.num_heads) * D)
        return cls(config, qkv_proj, RowParallelLinear.load(reader, f"{prefix}o_proj.weight", group, dtype, columns))

    def __call__(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 segments: list[Segment], caches: list[LayerCache | None], decode=None, layer: int = 0) -> torch.Tensor:
        """hidden_states [N, H] -> [N, H].

        caches[i] is segment i's cache of this layer (`layer_caches`); the new keys/values are written
        at [start_position, start_position + num_tokens) of it. The caller decides whether those
        slots count (commit) or are ignored (a failed step). decode: the step's
        `decode_attention.DecodeTable` (or None): its segments (caches[i] may then be None) go to the
        C kernel in one call, `layer` being this layer's index in their cache buffers; the others to SDPA."""
        num_tokens, A, G, D = hidden_states.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(hidden_states).view(num_tokens, A + 2 * G, D)  # [N, A + 2G, D]
        if decode is None:
            rotated = apply_rotary(qkv[:, :A + G], cos, sin)  # [N, A + G, D]: queries and keys at once
            attended = self._sdpa(qkv, rotated, segments, caches).transpose(0, 1)  # [N, A, D]
        else:
            attended = torch.empty(num_tokens, A, D, dtype=qkv.dtype)  # [N, A, D]
            decode.attend(layer, qkv, cos, sin, self.scaling, attended)  # RoPE inside
            if len(decode.indices) < len(segments):  # prompts in the step: SDPA for them
                others = [i for i in range(len(segments)) if i not in decode.indices]
                rotated = apply_rotary(qkv[:, :A + G], cos, sin)
                outputs = self._sdpa(qkv, rotated, [segments[i] for i in others], [caches[i] for i in others])
                row = 0
                for i in others:
                    first, count = segments[i].offset, segments[i].num_tokens
                    attended[first:first + count] = outputs[:, row:row + count].transpose(0, 1)
                    row += count
        return self.o_proj(attended.reshape(num_tokens, A * D))  # [N, H], summed over the TP group

    def _sdpa(self, qkv: torch.Tensor, rotated: torch.Tensor, segments: list[Segment],
              caches: list[LayerCache]) -> torch.Tensor:
        """Each segment's new keys/values into its cache and its attention by SDPA -> [A, n, D] for
        the segments' tokens, concatenated in their order (n = their tokens)."""
        A, G = self.num_heads, self.num_kv_heads
        queries = rotated[:, :A].transpose(0, 1)[None]                          # [1, A, N, D]
        new_kv = torch.stack((rotated[:, A:], qkv[:, A + G:])).transpose(1, 2)  # [2, G, N, D]: keys, values
        gqa = A != G  # SDPA repeats each key/value head for its query heads
        outputs = []
        for segment, cache in zip(segments, caches):
            first, count, start = segment.offset, segment.num_tokens, segment.start_position
            cache.new_slots.copy_(new_kv[:, :, first:first + count])
            mask = None  # one new token sees every cached one; a whole prompt is plainly causal
            if count > 1 and start > 0:  # a prompt chunk after cached tokens
                query_positions = torch.arange(start, start + count, device=qkv.device)
                mask = torch.arange(start + count, device=qkv.device)[None, :] <= query_positions[:, None]  # [n, L]
            # 4-d inputs (a batch of one): 3-d ones take SDPA's slow math path on CPU, not its fused kernel
            outputs.append(F.scaled_dot_product_attention(
                queries[:, :, first:first + count], cache.keys, cache.values, attn_mask=mask,
                scale=self.scaling, is_causal=mask is None and count > 1, enable_gqa=gqa))  # [1, A, n, D]
        return (torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0])[0]  # [A, n, D]


class SwiGLUMLP:
    """down(silu(gate x) * up x): an expert on an expert server.

    fp32 on the CPU goes to the C kernel (shardmesh.kernels), which streams each weight once for all
    rows: 1.7-2x torch's speed at 4-12 rows (10-11 GB/s, where MKL reads weights at 5-6 GB/s),
    1.1-1.25x at 1-3, 1.4x at 24, ~1.1x at 32, 0.7x at 64 (bench/expert_matmul.py). It takes every
    row count, prefill's too, because its rows do not depend on each other: a group cut into
    pieces over replicas gets the same bits as whole (torch at some sizes and the kernel at others
    would not). Other devices and dtypes, or no kernel: two torch matmuls (gate and up stay split:
    at 4-8 rows two [I, H] products ran 7-12% faster than one fused [2I, H] product)."""

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor):
        self.gate_proj = gate_proj  # [I, H]
        self.up_proj = up_proj      # [I, H]
        self.down_proj = down_proj  # [H, I]
        self.kernel = kernels.for_weights("experts", gate_proj, up_proj, down_proj)  # None: torch only

    @classmethod
    def load(cls, reader: CheckpointReader, gate: str, up: str, down: str, dtype: torch.dtype) -> "SwiGLUMLP":
        """Reads the three weights by their names on disk."""
        return cls(reader.get(gate, dtype), reader.get(up, dtype), reader.get(down, dtype))

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, H]."""
        if self.kernel is not None and kernels.usable(hidden_states):
            return self.kernel.expert_ffn(hidden_states, self.gate_proj, self.up_proj, self.down_proj)
        gate = F.silu(F.linear(hidden_states, self.gate_proj))  # [n, I]
        return F.linear(gate.mul_(F.linear(hidden_states, self.up_proj)), self.down_proj)

    def on_huge_pages(self) -> "SwiGLUMLP":
        """This expert with its three weights copied into 2 MiB pages (shardmesh.huge_pages: the kernel
        streams them ~1.13x faster), or itself when it runs on torch or nothing would move (under
        2 MiB of weights, huge pages off)."""
        if self.kernel is None:
            return self
        weights = [self.gate_proj, self.up_proj, self.down_proj]
        moved = huge_pages.to_huge_pages(weights)
        return self if moved is weights else SwiGLUMLP(*moved)

    @staticmethod
    def many(experts: list["SwiGLUMLP"], hidden_states: list[torch.Tensor], threads: int) -> list[torch.Tensor] | None:
        """[expert(x) for expert, x in zip(experts, hidden_states)] (x [n_e, H] each) in one kernel
        call that cuts every expert into pieces over `threads` threads (kernels.Kernel.expert_ffn_many:
        bit-identical to one by one), or None when some expert or input cannot take the kernel."""
        kernel = experts[0].kernel if experts else None
        if kernel is None or any(e.kernel is not kernel for e in experts) or not kernels.usable(*hidden_states):
            return None
        return kernel.expert_ffn_many([(x, e.gate_proj, e.up_proj, e.down_proj)
                                       for e, x in zip(experts, hidden_states)], threads)
