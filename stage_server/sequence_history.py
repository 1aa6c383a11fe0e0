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
        # sequence id -> [first_start_position, first_num_tokens, tokens_received, steps, frees]: plain
        # ints, updated every step (a protobuf message per sequence is made only when asked, `messages`)
        self._entries: collections.OrderedDict[int, list[int]] = collections.OrderedDict()

    def stepped(self, sequence_ids: list[int], start_positions: list[int], num_tokens: list[int]) -> None:
        """After a step succeeded: its sequences (a StageBatch's lists: no protobuf messages to walk)."""
        entries = self._entries
        for sequence_id, start_position, count in zip(sequence_ids, start_positions, num_tokens):
            entry = entries.get(sequence_id)
            if entry is None:
                entry = entries[sequence_id] = [start_position, count, 0, 0, 0]
            else:
                entries.move_to_end(sequence_id)
            entry[2] += count
            entry[3] += 1
        while len(entries) > self.limit:
            entries.popitem(last=False)

    def freed(self, sequence_ids) -> None:
        """`sequence_ids` were cached and are freed now."""
        for sequence_id in sequence_ids:
            entry = self._entries.get(sequence_id)
            if entry is not None:
                entry[4] += 1

    def messages(self) -> list[stage_pb2.SequenceHistory]:
        return [stage_pb2.SequenceHistory(sequence_id=sequence_id, first_start_position=first_start,
                                          first_num_tokens=first_num, tokens_received=tokens, steps=steps, frees=frees)
                for sequence_id, (first_start, first_num, tokens, steps, frees) in self._entries.items()]
