"""SequenceHistory: what a stage server received of each recent sequence (GetStageInfo).

A failover replays each running sequence's tokens to the stages (shardmesh.scheduler); Petals'
version of this broke silently (a replacement that got the prefix twice, or resumed at the wrong
position). The history lets a test check that a standby received each sequence's whole prefix
once, from position 0, and went on from there."""

import collections

from shardmesh.v1 import stage_pb2

MAX_SEQUENCES = 1024  # the most recently stepped sequences kept (a few hundred bytes each at most)


class SequenceHistory:
    def __init__(self, limit: int = MAX_SEQUENCES):
        self.limit = limit
        self._entries: collections.OrderedDict[int, stage_pb2.SequenceHistory] = collections.OrderedDict()

    def stepped(self, sequences) -> None:
        """After a step succeeded: `sequences` are its stage_pb2.SequenceSlice."""
        for piece in sequences:
            entry = self._entries.get(piece.sequence_id)
            if entry is None:
                entry = self._entries[piece.sequence_id] = stage_pb2.SequenceHistory(
                    sequence_id=piece.sequence_id, first_start_position=piece.start_position,
                    first_num_tokens=piece.num_tokens)
            entry.tokens_received += piece.num_tokens
            entry.steps += 1
            self._entries.move_to_end(piece.sequence_id)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def freed(self, sequence_ids) -> None:
        """`sequence_ids` were cached and are freed now."""
        for sequence_id in sequence_ids:
            entry = self._entries.get(sequence_id)
            if entry is not None:
                entry.frees += 1

    def messages(self) -> list[stage_pb2.SequenceHistory]:
        return list(self._entries.values())
