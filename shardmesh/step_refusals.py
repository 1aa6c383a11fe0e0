"""Sequences of a step that a stage refused on their own (StepResponse.refused), e.g. a new
sequence past the stage's KV capacity (`--max-cached-sequences`): only their requests fail; the
other sequences of the step were computed and go on.

The router's pipeline (router/pipeline.py) drops a refused sequence from the step before the next
stage and, when any were refused, raises `SequencesRefused` with the logits of the others; the
scheduler (shardmesh/scheduler.py) fails the refused ones with their status (the stages that had
already run them free their KV with the sequence) and samples the others as usual.
No grpc here: codes travel as grpc.StatusCode names, as in shardmesh.errors.
"""

from shardmesh import errors

_ERRORS = {cls.code: cls for cls in (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition,
                                     errors.Unavailable, errors.ResourceExhausted)}


def refusal_error(stage: str, code: str, field: str, message: str) -> errors.RequestError:
    """The error a refused sequence's client gets: the stage's status, naming the stage's field."""
    cls = _ERRORS.get(code, errors.Unavailable)
    return cls("stage", f"stage {stage} refused this sequence: {field}: {message}")


class SequencesRefused(Exception):
    """Some sequences of a step were refused by a stage; the others went through.

    errors: index into the step's slices -> the RequestError for that sequence's client;
    logits: [B - len(errors), V] float32 of the other sequences, in step order (None: all refused)."""

    def __init__(self, errors_by_index: dict[int, errors.RequestError], logits):
        super().__init__(f"{len(errors_by_index)} sequences of the step refused")
        self.errors, self.logits = errors_by_index, logits

    def kept(self, count: int) -> list[int]:
        """Indices (of a step of `count` sequences) that were not refused, in order."""
        return [i for i in range(count) if i not in self.errors]
