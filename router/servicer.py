"""RouterServicer (public API) and RegistryServicer (servers joining), thin over core code."""

import itertools
import logging

import grpc

from shardmesh import codec
from shardmesh.errors import FailedPrecondition, InvalidArgument, RequestError, ResourceExhausted, Unavailable
from shardmesh.grpc_util import abort_for, translate_errors
from shardmesh.sampling import Sampler, SamplingParams
from shardmesh.scheduler import Sequence
from shardmesh.sequence import RenderFailed, TokenEvent
from shardmesh.telemetry.requests import RequestTelemetry
from shardmesh.text import IncrementalDecoder
from shardmesh.v1 import router_pb2, router_pb2_grpc

from router.admission import held_refusal, refusal_details
from router.load import add_load_to_status

log = logging.getLogger(__name__)
GenerateResponse = router_pb2.GenerateResponse
FINISH_REASONS = {None: router_pb2.FINISH_REASON_UNSPECIFIED, "length": router_pb2.FINISH_REASON_LENGTH,
                  "stop": router_pb2.FINISH_REASON_STOP}
FINISH_NAMES = {code: name for name, code in FINISH_REASONS.items()}


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, state):
        self.state = state  # router.main.RouterState
        self._sequence_ids = itertools.count(1)

    def _prompt(self, request: router_pb2.GenerateRequest) -> list[int]:
        config = self.state.config
        if request.prompt_token_ids and request.prompt_text:
            raise InvalidArgument("prompt_text", "give prompt_token_ids or prompt_text, not both")
        if request.prompt_text:
            if self.state.text is None:
                raise FailedPrecondition("prompt_text", "this checkpoint has no tokenizer.json: send prompt_token_ids")
            prompt = self.state.text.encode(request.prompt_text)
            if not prompt:
                raise InvalidArgument("prompt_text", "the text tokenizes to no tokens")
            return prompt
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids", "empty prompt: give prompt_token_ids or prompt_text")
        for i, token_id in enumerate(request.prompt_token_ids):
            if not 0 <= token_id < config.vocab_size:
                raise InvalidArgument(f"prompt_token_ids[{i}]", f"{token_id} is outside [0, {config.vocab_size})")
        return list(request.prompt_token_ids)

    def _sequence(self, request: router_pb2.GenerateRequest) -> Sequence:
        prompt = self._prompt(request)
        max_context = self.state.max_context
        if request.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", f"{request.max_new_tokens} must be >= 1")
        if len(prompt) + request.max_new_tokens > max_context:
            # A prompt that leaves no room for one new token is the prompt's fault, else max_new_tokens'.
            field = "max_new_tokens" if len(prompt) < max_context else (
                "prompt_text" if request.prompt_text else "prompt_token_ids")
            raise InvalidArgument(field, f"prompt ({len(prompt)} tokens) + max_new_tokens "
                                  f"({request.max_new_tokens}) exceeds the context limit {max_context}")
        for i, token_id in enumerate(request.stop_token_ids):
            if not 0 <= token_id < self.state.config.vocab_size:
                raise InvalidArgument(f"stop_token_ids[{i}]", f"{token_id} is outside [0, {self.state.config.vocab_size})")
        sampling = request.sampling
        params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
                                seed=sampling.seed if sampling.HasField("seed") else None)
        stop = set(request.stop_token_ids)
        if not request.ignore_eos:
            stop.update(self.state.config.eos_token_ids)
        return Sequence(next(self._sequence_ids), prompt, request.max_new_tokens, frozenset(stop),
                        Sampler(params), return_logits=request.return_logits)

    async def Generate(self, request, context):
        """Server streaming: one GenerateResponse per token, written as the scheduler hands it over.

        Each token's response (its text piece, metrics, the message) is made by `render` in the
        scheduler's hand-over of the step (SequenceEvents.render), back to back with the other
        sequences'; this call only writes it. A coroutine awaiting `context.write` rather than an async
        generator: the generator (and the request guard's generator around it:
        shardmesh/request_guard.py) would be resumed, and would yield, for every token."""
        try:
            if self.state.admission_full():  # router.admission.AdmissionGate refuses first, for less; this is the race
                raise ResourceExhausted("router", refusal_details(self.state.max_queued).partition(": ")[2])
            sequence = self._sequence(request)
            if not self.state.serving:
                raise Unavailable("router", self.state.unavailable_reason())
            caller = self.state.caller_limit.acquire(context)  # router/caller_limit.py; released below
        except RequestError as error:
            if error.field == "caller":  # past --max-sequences-per-caller: the tarpit may hold it
                error = ResourceExhausted("caller", error.message + await held_refusal(self.state, context))
            await abort_for(context, error)
            return
        push = IncrementalDecoder(self.state.text).push
        telemetry = RequestTelemetry(sequence.sequence_id, context)  # metrics, trace, request id in logs
        outcome = "cancelled"
        prompt_tokens = len(sequence.prompt)

        def render(event: TokenEvent) -> router_pb2.GenerateResponse:  # in the scheduler's hand-over
            response = GenerateResponse(token_id=event.token_id, text=push(event.token_id), index=event.index,
                                        prompt_tokens=prompt_tokens)
            if event.finish_reason:
                response.finish_reason = FINISH_REASONS[event.finish_reason]
            if event.logits is not None:
                response.logits.CopyFrom(codec.encode(event.logits))
            telemetry.token()
            return response

        events, write = sequence.events, context.write
        events.render = render  # shardmesh/sequence.py: each token's response is made as it is handed over
        self.state.scheduler.submit(sequence)
        try:
            while True:
                response = await events.get()
                if type(response) is not GenerateResponse:
                    if isinstance(response, RenderFailed):
                        raise response.error
                    code = outcome = response.code if isinstance(response, RequestError) else "UNAVAILABLE"
                    await context.abort(getattr(grpc.StatusCode, code), str(response))
                    return
                await write(response)
                if response.finish_reason:
                    outcome = FINISH_NAMES[response.finish_reason]
                    return
        finally:
            events.render = None  # tokens of a step still in flight: not counted once the call ended
            telemetry.finish(outcome)
            # Client cancelled or disconnected (or the stream ended): free the sequence everywhere.
            self.state.scheduler.cancel(sequence)
            self.state.caller_limit.release(caller)

    async def GetModelInfo(self, request, context):
        config = self.state.config
        return router_pb2.ModelInfo(
            family=config.family, num_layers=config.num_layers, hidden_size=config.hidden_size,
            vocab_size=config.vocab_size, max_context=self.state.max_context, num_experts=config.num_experts,
            experts_per_token=config.experts_per_token, has_tokenizer=self.state.text is not None,
            eos_token_ids=list(config.eos_token_ids), model_fingerprint=config.fingerprint)

    @translate_errors
    async def GetClusterStatus(self, request, context):
        status = self.state.cluster.status(self.state.serving, self.state.scheduler.active)
        if request.include_expert_load:
            await add_load_to_status(status, request, self.state)  # router/load.py
        return status


class RegistryServicer(router_pb2_grpc.RegistryServicer):
    def __init__(self, state):
        self.state = state

    @translate_errors
    async def RegisterServer(self, request, context):
        cluster = self.state.cluster
        if request.HasField("tp_shard"):  # a TP shard asking for its rank / its group's rendezvous
            return cluster.tp_ranks.answer(request)
        async with self.state.registry_lock:
            assigned = cluster.assignment_to_restore(request)
            if assigned is not None:  # restarted after a live placement change: it must load those first
                log.info("%s%s at %s is told to hold its %d assigned experts", request.name,
                         f" replica {request.replica_id!r}" if request.replica_id else "", request.address, len(assigned))
                return router_pb2.RegisterServerResponse(
                    placement_version=cluster.placement_version, reassigned=True,
                    assigned_experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in assigned])
            before = cluster.registration_state()
            cluster.register(request)
            if cluster.registration_state() != before:  # periodic re-registrations change nothing
                log.info("registered %s%s at %s", request.name,
                         f" replica {request.replica_id!r}" if request.replica_id else "", request.address)
                await self.state.on_cluster_change()
        return router_pb2.RegisterServerResponse(placement_version=cluster.placement_version)
