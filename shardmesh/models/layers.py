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

import dataclasses

import torch
import torch.nn.functional as F

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


class RMSNorm:
    """x / rms(x) * weight, the mean of squares taken in float32 as in transformers."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight = weight  # [H]
        self.eps = eps

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding:
    """Default RoPE (no scaling): cos/sin of position * theta^(-2i/D), the halves concatenated."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu"):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        self.inv_freq = 1.0 / (theta ** exponents)  # [D/2]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int64 [N] -> (cos, sin), each [N, D] in `dtype`."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [N, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)                   # [N, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """states [N, heads, D] rotated by cos/sin [N, D] (rotate-half convention of transformers)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    first, second = states.chunk(2, dim=-1)
    return states * cos + torch.cat((-second, first), dim=-1) * sin


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
                 segments: list[Segment], kv_buffers: list[torch.Tensor]) -> torch.Tensor:
        """hidden_states [N, H] -> [N, H].

        kv_buffers[i] is segment i's cache for this layer, [2, G, capacity, D] (keys, values); the new
        keys/values are written at [start_position, start_position + num_tokens). The caller decides
        whether those slots count (commit) or are ignored (a failed step)."""
        num_tokens = hidden_states.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = self.qkv_proj(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        query = apply_rotary(query.view(num_tokens, self.num_heads, self.head_dim), cos, sin)   # [N, A, D]
        key = apply_rotary(key.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)    # [N, G, D]
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)                         # [N, G, D]
        gqa = self.num_heads != self.num_kv_heads  # SDPA repeats each key/value head for its query heads
        queries, keys, values = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # [heads, N, D]
        outputs = []
        for segment, buffer in zip(segments, kv_buffers):
            rows = slice(segment.offset, segment.offset + segment.num_tokens)
            start, end = segment.start_position, segment.start_position + segment.num_tokens
            buffer[0, :, start:end] = keys[:, rows]
            buffer[1, :, start:end] = values[:, rows]
            mask = None  # one new token sees every cached one; a whole prompt is plainly causal
            if segment.num_tokens > 1 and start > 0:  # a prompt chunk after cached tokens
                query_positions = torch.arange(start, end, device=buffer.device)
                mask = torch.arange(end, device=buffer.device)[None, :] <= query_positions[:, None]  # [n, L]
            # 4-d inputs (a batch of one): 3-d ones take SDPA's slow math path on CPU, not its fused kernel
            attended = F.scaled_dot_product_attention(
                queries[None, :, rows], buffer[None, 0, :, :end], buffer[None, 1, :, :end], attn_mask=mask,
                scale=self.scaling, is_causal=mask is None and segment.num_tokens > 1, enable_gqa=gqa)[0]  # [A, n, D]
            outputs.append(attended.transpose(0, 1).reshape(segment.num_tokens, q_size))
        return self.o_proj(torch.cat(outputs))  # [N, H], summed over the TP group


class SwiGLUMLP:
    """down(silu(gate x) * up x), gate and up fused into one matmul."""

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor):
        self.gate_up_proj = torch.cat([gate_proj, up_proj])  # [2I, H]
        self.down_proj = down_proj                          # [H, I]

    @classmethod
    def load(cls, reader: CheckpointReader, gate: str, up: str, down: str, dtype: torch.dtype) -> "SwiGLUMLP":
        """Reads the three weights by their names on disk."""
        return cls(reader.get(gate, dtype), reader.get(up, dtype), reader.get(down, dtype))

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, H]."""
        gate, up = F.linear(hidden_states, self.gate_up_proj).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, self.down_proj)
