"""A step's new sequences past this stage's KV capacity (`--max-cached-sequences`) are refused on
their own (StepResponse.refused, RESOURCE_EXHAUSTED naming `sequences[i].sequence_id`) and the
step runs for the others, so sequences batched with a refused one are not failed with it
(shardmesh/step_refusals.py is the router's side).

On a tensor-parallel stage rank 0 decides and forwards the step without the refused sequences;
the other shards run what it sent (their caches hold what rank 0's holds) and never split, so
every rank runs the same step. Racing steps of disjoint sequences are caught by StageModel.validate
in StageModel.forward."""

import torch

from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.v1 import stage_pb2


def split_over_capacity(model: StageModel, batch: StageBatch) -> tuple[StageBatch | None, list]:
    """(the batch without the new sequences that do not fit, or None when none is left; a
    stage_pb2.SequenceRefusal for each sequence taken out). The batch itself when all fit."""
    limit = model.max_cached_sequences
    ids, num_tokens = batch.sequence_ids, batch.num_tokens
    if (not limit or len(set(ids)) != len(ids) or min(num_tokens, default=0) < 1 or batch.inputs.dim() < 1
            or batch.inputs.shape[0] != sum(num_tokens)):
        return batch, []  # nothing to refuse, or a malformed step: StageModel.validate names its fault
    room = limit - len(model.cache)
    refused: list[stage_pb2.SequenceRefusal] = []
    for i, (sequence_id, start) in enumerate(zip(batch.sequence_ids, batch.start_positions)):
        if sequence_id in model.cache or start > 0:  # cached, or not new (StageModel.validate judges it)
            continue
        if room > 0:
            room -= 1
            continue
        refused.append(stage_pb2.SequenceRefusal(
            index=i, code="RESOURCE_EXHAUSTED", field=f"sequences[{i}].sequence_id",
            message=f"sequence {sequence_id} is new, and this stage's KV cache holds at most {limit} sequences "
                    f"(--max-cached-sequences): free one first"))
    if not refused:
        return batch, []
    out = {r.index for r in refused}
    kept = [i for i in range(len(batch.sequence_ids)) if i not in out]
    if not kept:
        return None, refused
    offsets = [0]
    for num_tokens in batch.num_tokens:
        offsets.append(offsets[-1] + num_tokens)
    rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in kept])  # [N'] rows of the kept tokens
    return StageBatch(sequence_ids=[batch.sequence_ids[i] for i in kept],
                      start_positions=[batch.start_positions[i] for i in kept],
                      num_tokens=[batch.num_tokens[i] for i in kept],
                      inputs=batch.inputs.index_select(0, rows), greedy=batch.greedy), refused  # [N'] or [N', H]
