"""StageModel: a contiguous layer range [start_layer, end_layer) of the model, its KV cache and MoE gates.

The first stage also holds the token embedding, the last the final norm and LM head. A step takes
a packed batch of several sequences' new tokens (`StageBatch`), runs every linear layer on the
whole batch and attention per sequence against its cache, and, for MoE layers, sends each
expert's tokens through an `ExpertBackend` (in process or remote). Transport-free: servicers call
`validate` / `forward` / `free` and translate `shardmesh.errors` into statuses.

Shape legend: N new tokens in the step (all sequences packed), H hidden_size, V vocab_size,
S sequences in the step.
"""

import array
import dataclasses
import typing
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from shardmesh import kernels
from shardmesh.checkpoint import CheckpointReader
from shardmesh.compute_pool import parallel_linear
from shardmesh.config import ModelConfig
from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from shardmesh.greedy_head import GreedyHead
from shardmesh.huge_pages import to_huge_pages
from shardmesh.kv_cache import KVCache
from shardmesh.models import get_family
from shardmesh.models.decode_attention import DecodeTable
from shardmesh.models.decode_layer import DecodeLayerStep, DecodeLayerWeights
from shardmesh.models.layers import Attention, RMSNorm, RotaryEmbedding, RotaryTable, Segment, layer_caches
from shardmesh.models.moe import MoEGate
from shardmesh.models.moe_step import MoEStep
from shardmesh.models.parallel import HeadShard, ParallelSwiGLUMLP, check_tp_shapes, moe_block
from shardmesh.sampling import GreedyTokens
from shardmesh.tp_group import SINGLE, TPGroup


@dataclasses.dataclass
class StageBatch:
    sequence_ids: list[int]
    start_positions: list[int]   # per sequence; must equal tokens already cached for it (0 = new sequence)
    num_tokens: list[int]        # per sequence, >= 1; N = sum(num_tokens); tokens packed in sequence order
    inputs: torch.Tensor         # first stage: token ids int64 [N]; other stages: hidden_states [N, H] (stage dtype)
    greedy: bool = False         # every sequence samples greedily: the last stage may answer GreedyTokens


class ExpertBackend(typing.Protocol):
    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """groups: expert id -> hidden_states [n_e, H] routed to it (a mapping: MoEGate.dispatch gives a
        read-only PackedRows); returns a mapping expert id -> that expert's output [n_e, H] (unweighted)."""
        ...


@dataclasses.dataclass
class DecoderLayer:
    input_layernorm: RMSNorm
    self_attn: Attention
    post_attention_layernorm: RMSNorm
    ffn: ParallelSwiGLUMLP | MoEGate


class StageModel:
    def __init__(self, config: ModelConfig, start_layer: int, end_layer: int, reader: CheckpointReader,
                 dtype: torch.dtype = torch.float32, tp: TPGroup | None = None):
        """Loads only what the stage holds: its layers' attention, norms and MLP (dense) or gate (MoE);
        embed_tokens if first; final norm and lm_head (or the tied embedding) if last. Never experts.

        tp: this server's tensor-parallel group when the stage is served by T shard servers: it then
        reads only its slice of the attention and MLP weights (`models.parallel`) and caches only its
        KV heads; norms, MoE gate, embedding and LM head stay whole on every rank. Every rank of the
        group must run the same steps, in the same order."""
        if not 0 <= start_layer < end_layer <= config.num_layers:
            raise ValueError(f"layer range [{start_layer}, {end_layer}) is not inside [0, {config.num_layers})")
        family = get_family(config.family)
        self.tp = tp or SINGLE
        check_tp_shapes(config, self.tp.world_size)
        self.config, self.start_layer, self.end_layer, self.dtype = config, start_layer, end_layer, dtype
        self.is_first = start_layer == 0
        self.is_last = end_layer == config.num_layers
        self.device = torch.device(reader.device)
        eps = config.rms_norm_eps
        self.layers: list[DecoderLayer] = []
        for layer in range(start_layer, end_layer):
            prefix = family.layer_prefix(layer)
            self.layers.append(DecoderLayer(
                input_layernorm=RMSNorm(reader.get(prefix + "input_layernorm.weight", dtype), eps),
                self_attn=Attention.load(config, reader, prefix + "self_attn.", dtype, self.tp),
                post_attention_layernorm=RMSNorm(reader.get(prefix + "post_attention_layernorm.weight", dtype), eps),
                ffn=family.load_ffn(config, layer, reader, dtype, self.tp),
            ))
        self.embed_tokens = reader.get(family.EMBED_TOKENS, dtype) if self.is_first else None  # [V, H]
        self.norm = self.lm_head = None
        if self.is_last:
            self.norm = RMSNorm(reader.get(family.FINAL_NORM, dtype), eps)
            if not config.tie_word_embeddings and family.LM_HEAD in reader:
                self.lm_head = reader.get(family.LM_HEAD, dtype)  # [V, H]
            else:
                self.lm_head = self.embed_tokens if self.embed_tokens is not None else reader.get(family.EMBED_TOKENS, dtype)
        self._weights_to_huge_pages()
        # the greedy tokens without every logit (shardmesh/greedy_head.py; + V H bytes; None: off or no AMX)
        self.greedy_head = GreedyHead.of(self.lm_head, self.tp.world_size) if self.device.type == "cpu" else None
        # each layer's attention half as the decode-layer kernel reads it (None: torch only; models/decode_layer.py)
        self._decode_layers = [DecodeLayerWeights.of(layer.input_layernorm, layer.self_attn,
                                                     layer.post_attention_layernorm, self.tp.world_size)
                               for layer in self.layers]
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, self.device)
        self.rotary_rows = RotaryTable(self.rotary, dtype)  # its rows per position, made once
        # the first stage's embedding [V, H] as a numpy view on the CPU in float32 (gathered by take), else None
        self._embedding_rows = (self.embed_tokens.numpy() if self.is_first and self.device.type == "cpu"
                                and dtype == torch.float32 else None)
        # a decode step's final norm by the decode layer's C norm (DecodeLayerStep.norm) where it takes the weight
        self._kernel_final_norm = self.norm is not None and self.device.type == "cpu" and kernels.usable(self.norm.weight)
        # (H, E, K) of the MoE gates when a decode step's MoE layers can share one MoEStep (one rank), else None
        self._moe_step_shape = MoEStep.shape_of([layer.ffn for layer in self.layers if isinstance(layer.ffn, MoEGate)]) \
            if self.tp.world_size == 1 else None
        self._decode_reuse: tuple | None = None  # (DecodeTable, DecodeLayerStep | None) of the last step, or None
        self._decode_workspace: dict = {}  # DecodeLayerStep's scratch, kept from step to step (steps run on one thread)
        self.cache = KVCache(end_layer - start_layer, HeadShard.of(config, self.tp).num_kv_heads, config.head_dim,
                             config.max_position_embeddings, dtype, self.device)
        self._in_flight: set[int] = set()  # sequences inside a forward that has not finished
        self._freed_in_flight: set[int] = set()  # freed while in flight: not committed when that step ends
        # Sequences the KV cache may hold (0 = no limit; a stage's --max-cached-sequences): a step
        # that would start one more gets RESOURCE_EXHAUSTED naming it, and changes nothing.
        self.max_cached_sequences = 0

    def _weights_to_huge_pages(self) -> None:
        """The weights each step streams (attention, dense MLPs, LM head) into huge pages (shardmesh.huge_pages)."""
        if self.device.type != "cpu":
            return
        linears = [layer.self_attn.qkv_proj for layer in self.layers] + [layer.self_attn.o_proj for layer in self.layers]
        linears += [linear for layer in self.layers if isinstance(layer.ffn, ParallelSwiGLUMLP)
                    for linear in (layer.ffn.gate_up_proj, layer.ffn.down_proj)]
        tensors = [linear.weight for linear in linears] + ([self.lm_head] if self.lm_head is not None else [])
        moved = to_huge_pages(tensors)
        for linear, weight in zip(linears, moved):
            linear.weight = weight
        if self.lm_head is not None:
            if self.embed_tokens is self.lm_head:  # tied: one copy for both
                self.embed_tokens = moved[-1]
            self.lm_head = moved[-1]

    def validate(self, batch: StageBatch) -> None:
        """Raise InvalidArgument / NotFound / FailedPrecondition naming the offending request field."""
        count = len(batch.sequence_ids)
        if count == 0:
            raise InvalidArgument("sequences", "a step needs at least one sequence")
        if len(batch.start_positions) != count or len(batch.num_tokens) != count:
            raise InvalidArgument("sequences", f"{count} sequence ids but {len(batch.start_positions)} start "
                                               f"positions and {len(batch.num_tokens)} token counts")
        seen, new_sequences = set(), 0
        for i, (sequence_id, start, num_tokens) in enumerate(
                zip(batch.sequence_ids, batch.start_positions, batch.num_tokens)):
            if sequence_id in seen:
                raise InvalidArgument("sequences", f"sequence id {sequence_id} appears twice in one step")
            seen.add(sequence_id)
            if num_tokens < 1:
                raise InvalidArgument(f"sequences[{i}].num_tokens", f"{num_tokens} < 1")
            if start < 0:
                raise InvalidArgument(f"sequences[{i}].start_position", f"{start} < 0")
            if start + num_tokens > self.config.max_position_embeddings:
                raise InvalidArgument(f"sequences[{i}].num_tokens", f"positions up to {start + num_tokens} exceed "
                                      f"max_position_embeddings {self.config.max_position_embeddings}")
            if sequence_id in self._in_flight:
                raise FailedPrecondition(f"sequences[{i}].sequence_id",
                                         f"sequence {sequence_id} is already in a step that has not finished")
            if sequence_id not in self.cache:
                if start > 0:
                    raise NotFound(f"sequences[{i}].sequence_id",
                                   f"sequence {sequence_id} is not cached here (start_position {start} > 0)")
                new_sequences += 1
                limit = self.max_cached_sequences
                if limit and len(self.cache) + new_sequences > limit:
                    raise ResourceExhausted(f"sequences[{i}].sequence_id", f"sequence {sequence_id} is new, and "
                                            f"this stage's KV cache holds at most {limit} sequences "
                                            f"(--max-cached-sequences): free one first")
            elif start != self.cache.length(sequence_id):
                raise FailedPrecondition(f"sequences[{i}].start_position", f"{start} but sequence {sequence_id} "
                                         f"has {self.cache.length(sequence_id)} tokens cached")
        self._validate_inputs(batch.inputs, sum(batch.num_tokens))

    def _validate_inputs(self, inputs: torch.Tensor, num_tokens: int) -> None:
        if self.is_first:
            if inputs.dim() != 1 or inputs.shape[0] != num_tokens or inputs.dtype.is_floating_point \
                    or inputs.dtype == torch.bool or inputs.is_complex():
                raise InvalidArgument("token_ids", f"{inputs.dtype} {list(inputs.shape)} is not "
                                                   f"integer [{num_tokens}] (the sum of num_tokens)")
            # (the ids as Python ints, one torch op: on a stage's cold caches each op costs tens of us)
            token_ids, vocab_size = inputs.tolist(), self.config.vocab_size
            if num_tokens and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
                bad = next(token_id for token_id in token_ids if not 0 <= token_id < vocab_size)
                raise InvalidArgument("token_ids", f"token id {bad} is outside [0, {vocab_size})")
        else:
            expected = [num_tokens, self.config.hidden_size]
            if list(inputs.shape) != expected or inputs.dtype != self.dtype:
                raise InvalidArgument("hidden_states", f"{inputs.dtype} {list(inputs.shape)} is not "
                                                       f"{self.dtype} {expected}")

    async def forward(self, batch: StageBatch, experts: "ExpertBackend | None",
                      validated: bool = False) -> torch.Tensor | GreedyTokens:
        """Run the stage's layers on the step's new tokens; atomic with respect to the KV cache.

        Returns hidden_states [N, H] (stage dtype), or on the last stage logits float32 [S, V] at each
        sequence's last new token; or, when batch.greedy and the greedy head can take the step,
        GreedyTokens: each row's argmax of those logits, without computing them all. The cache of
        this step's sequences is extended only when the whole step succeeds; on any exception it is
        as it was before the call. validated: the caller has just passed `batch` through `validate`,
        with no await since (nothing can have changed)."""
        if not validated:
            self.validate(batch)
        if experts is None and self.config.is_moe:
            raise ValueError("an MoE stage needs an ExpertBackend")
        segments, offset = [], 0
        for start, num_tokens in zip(batch.start_positions, batch.num_tokens):
            segments.append(Segment(offset, start, num_tokens))
            offset += num_tokens
        buffers = [self.cache.reserve(sid, s.start_position + s.num_tokens)
                   for sid, s in zip(batch.sequence_ids, segments)]  # each [layers, 2, G, capacity, D]
        self._in_flight.update(batch.sequence_ids)
        try:
            output = await self._run_layers(batch.inputs.to(self.device), segments, buffers, experts, batch.greedy)
        finally:
            self._in_flight.difference_update(batch.sequence_ids)
            freed = self._freed_in_flight.intersection(batch.sequence_ids)
            self._freed_in_flight -= freed
        for sequence_id, segment, buffer in zip(batch.sequence_ids, segments, buffers):
            if sequence_id not in freed:
                self.cache.commit(sequence_id, buffer, segment.start_position + segment.num_tokens)
        return output

    async def _run_layers(self, inputs: torch.Tensor, segments: list[Segment], buffers: list[torch.Tensor],
                          experts: "ExpertBackend | None", greedy: bool = False) -> torch.Tensor | GreedyTokens:
        end = max(s.start_position + s.num_tokens for s in segments)
        if self._embedding_rows is not None:  # the embedding's rows by a numpy gather, as for the rotary rows
            hidden_states = torch.from_numpy(self._embedding_rows.take(inputs.numpy(), 0))  # [N, H]
        elif self.is_first:
            hidden_states = F.embedding(inputs.long(), self.embed_tokens)  # [N, H]
        else:
            hidden_states = inputs                                          # [N, H]
        # an earlier step's table and decode layer step, taken again (updated in place) when this step has
        # the same sequences with the same cache buffers; none of their sequences is in a step now (validate)
        previous_decode, previous_fused = self._decode_reuse or (None, None)
        decode = DecodeTable.of(segments, buffers, previous_decode)  # one-token sequences: attention in one C call per layer
        # a step of one-token sequences only: each layer's attention half in one C call (models/decode_layer.py),
        # which reads each sequence's RoPE rows from the tables by its position
        fused = DecodeLayerStep.of(segments, decode, *self.rotary_rows.covering(end), self._decode_layers,
                                   workspace=self._decode_workspace, previous=previous_fused, by_position=True)
        self._decode_reuse = (decode, fused) if decode is not None else None
        if fused is None:
            values = array.array("q")  # [N], each segment's start_position, start_position + 1, ...
            for segment in segments:
                values.extend(range(segment.start_position, segment.start_position + segment.num_tokens))
            cos, sin = self.rotary_rows.rows_at(values, end)  # [N, D] each
        # and then the MoE glue's table and output made once for every layer (models/moe_step.py)
        moe_step = MoEStep.of(len(segments), self._moe_step_shape) if fused is not None else None
        skip = decode.indices if decode is not None else ()
        caches = [] if fused is not None else [  # [S][layers] (the kernel reads the buffers through decode's table)
            [None] * len(self.layers) if i in skip else layer_caches(buffer, segment)
            for i, (buffer, segment) in enumerate(zip(buffers, segments))]
        for index, layer in enumerate(self.layers):
            if fused is not None:  # norms, attention, residual add: one threaded C call (no torch op to spare)
                residual, hidden_states = fused.attention_half(index, hidden_states)
            else:
                # inference_mode saves per-op work (no version counters or view tracking) on these many
                # small ops. Only around code with no await: the mode is per thread, and other coroutines
                # run at an await. The KV buffers and what leaves this method stay normal tensors.
                with torch.inference_mode():
                    residual = hidden_states
                    hidden_states = layer.input_layernorm(hidden_states)
                    hidden_states = layer.self_attn(hidden_states, cos, sin, segments, [c[index] for c in caches],
                                                    decode, index)
                    residual = residual + hidden_states
                    hidden_states = layer.post_attention_layernorm(residual)
            if isinstance(layer.ffn, MoEGate):  # the residual added in combine's pass
                hidden_states = await moe_block(layer.ffn, hidden_states, experts, self.start_layer + index, self.tp,
                                                residual, moe_step)
            else:
                hidden_states = residual + layer.ffn(hidden_states)
        if not self.is_last:
            return hidden_states
        if len(segments) == hidden_states.shape[0]:  # one token each (decode): every row, in order, as it is
            last = hidden_states                                                  # [S, H]
        else:
            last = hidden_states[torch.tensor([s.offset + s.num_tokens - 1 for s in segments], device=self.device)]
        if fused is not None and self._kernel_final_norm:  # the decode layer's C norm: one call, no torch op
            normed = fused.norm(last, self.norm)                                  # [S, H]
        else:
            normed = self.norm(last)                                              # [S, H]
        if greedy and self.greedy_head is not None:
            tokens = self.greedy_head.tokens(normed)  # None: a premise failed, the full head decides
            if tokens is not None:
                return GreedyTokens(tokens)
        # The LM head is the stage's largest matmul: split over the compute threads (compute_pool).
        return parallel_linear(normed, self.lm_head).float()  # [S, V]

    def free(self, sequence_ids: Iterable[int]) -> int:
        """Drop these sequences' KV cache; returns how many were cached (unknown ids are ignored).
        A sequence freed while a step runs on it is not cached when that step ends."""
        sequence_ids = list(sequence_ids)
        self._freed_in_flight.update(self._in_flight.intersection(sequence_ids))
        self._decode_reuse = None  # it holds the last step's cache buffers: let them go
        return self.cache.free(sequence_ids)

    def cached_sequence_ids(self) -> list[int]:
        return self.cache.sequence_ids()

    def cached_length(self, sequence_id: int) -> int:
        """Tokens cached for this sequence (0 if unknown)."""
        return self.cache.length(sequence_id)
