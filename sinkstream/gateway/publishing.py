"""Routes that write input: a JSON batch of entries, a WebVTT caption chunk, the end marker.

Every write goes through the producer library (``producer.keyed.KeyedProducer``), so HTTP
input gets what library input gets: the stream-id check, splitting of long texts at
whitespace, backpressure at ``max_stream_length``, registration and the dispatcher's
wake-up, and idempotent retries: the ``Idempotency-Key`` header (scoped to the caller's token)
becomes the producer id and the entries are numbered from 1, so a retried request, even one
whose first attempt landed halfway, adds nothing twice. A request without a key gets a random
one: it is safe against the gateway's own retries to Redis, not against the client's.

The whole batch is validated before anything is written: a bad entry is a 422 naming it, and
nothing of the batch lands.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from starlette.concurrency import run_in_threadpool
from typing_extensions import NotRequired, TypedDict

from monitoring import gateway_metrics as m
from producer.encoding import EncodedEntry, encode_turn
from producer.formats import InputFormatError, parse_vtt
from producer.keyed import KeyedProducer
from producer.publisher import StreamFullError
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.kinds import META_FIELD as KIND_FIELD
from sinkstream.contracts.kinds import StreamKind
from sinkstream.gateway.access import Access, gateway, require
from sinkstream.gateway.context import Gateway

router = APIRouter(prefix="/v1/streams", tags=["publishing"])
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", max_length=200,
    description="retry with the same key and body: nothing is added twice (24 h window)")]


@with_config(ConfigDict(extra="forbid"))
class EntryIn(TypedDict):
    """One input entry (the input contract's fields). A TypedDict, not a model: validating
    a 1,000-entry batch into dicts costs less than half as much (``benchmarks/gateway.py``)."""

    text: Annotated[str, Field(description="UTF-8 text; split at whitespace when over "
                                           "max_entry_bytes")]
    speaker: NotRequired[Annotated[str | None, Field(description="speaker name")]]
    ts: NotRequired[Annotated[float | None, Field(allow_inf_nan=False,
                                                  description="seconds (media or unix)")]]
    kind: NotRequired[Annotated[Literal["meeting", "log"] | None, Field(
        description="stream kind (meeting, the default, or log): sets the stream's kind "
                    "(sinkstream.contracts.kinds); one request names at most one kind")]]


@with_config(ConfigDict(extra="forbid"))
class EntriesIn(TypedDict):
    entries: Annotated[list[EntryIn], Field(description="entries in order")]
    end: NotRequired[Annotated[bool, Field(description="also end the stream after these")]]


ENTRIES = TypeAdapter(EntriesIn)


class EndIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field("", description="an optional last text")


class Published(BaseModel):
    stream: str
    entries: int = Field(description="entries in the stream for this request (splits and "
                                     "the end marker included)")
    added: int = Field(description="entries this attempt appended")
    duplicates: int = Field(description="entries an earlier attempt with the same key had "
                                        "already appended")
    last_id: str | None


def _encode(entries: Sequence[EntryIn], limit: int) -> list[EncodedEntry]:
    """Validate and encode every entry as the producer would (split when long), before
    anything is written: one bad entry is a 422 naming it, and nothing of the batch lands."""
    out: list[EncodedEntry] = []
    for index, entry in enumerate(entries):
        try:
            out.extend(encode_turn((entry["text"], entry.get("speaker") or None,
                                    entry.get("ts")), limit))
        except (TypeError, ValueError) as exc:
            reason = str(exc).replace("use end_stream()", "POST .../end")
            raise HTTPException(422, f"entries[{index}]: {reason}") from None
    return out


def _publish(gw: Gateway, access: Access, key: str | None, entries: list[EncodedEntry],
             end: bool) -> Published:
    """Append through a keyed producer; errors become statuses a client can act on."""
    producer = KeyedProducer(gw.client, gw.settings, access.principal.token_id,
                             key or secrets.token_hex(16), script_sha=gw.script_sha)
    try:
        result = producer.publish_encoded(access.stream_id, entries, eos=end)
    except StreamFullError as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "1"}) from None
    except redis.RedisError as exc:
        raise HTTPException(503, f"Redis is unavailable ({type(exc).__name__}); retry with "
                                 "the same Idempotency-Key", headers={"Retry-After": "2"}) \
            from None
    gw.script_sha = producer.script_sha
    gw.maybe_prune(access.stream_id)
    added = result.entries - result.duplicates
    m.ENTRIES.labels("added").inc(added)
    m.ENTRIES.labels("duplicate").inc(result.duplicates)
    return Published(stream=access.stream_id, entries=result.entries, added=added,
                     duplicates=result.duplicates, last_id=result.last_id)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, for a hand-declared request body."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


def _parse_entries(raw: bytes) -> EntriesIn:
    """The body parsed and validated in one pass (pydantic-core's JSON parser): the hot path
    of publishing, measured by ``benchmarks/gateway.py``."""
    try:
        return ENTRIES.validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


@router.post("/{stream_id}/entries", response_model=Published,
             responses={401: {}, 403: {}, 413: {}, 422: {}, 429: {}, 503: {}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": _inline(ENTRIES.json_schema())}}}})
async def post_entries(request: Request, idempotency_key: IdempotencyKey = None,
                       access: Access = Depends(require("publish")),
                       gw: Gateway = Depends(gateway)) -> Published:
    """Append a batch of entries (and optionally end the stream). Needs ``publish``."""
    body = _parse_entries(await request.body())
    entries, end = body["entries"], body.get("end", False)
    limit = gw.settings.gateway_max_batch_entries
    if len(entries) > limit:
        raise HTTPException(413, f"{len(entries)} entries in one request, over the limit "
                                 f"of {limit} (SINKSTREAM_GATEWAY_MAX_BATCH_ENTRIES): send "
                                 "smaller batches")
    if not entries and not end:
        raise HTTPException(422, "no entries (and end is false): nothing to publish")

    kind = _kind_of(entries)

    def publish() -> Published:
        encoded = _encode(entries, gw.settings.max_entry_bytes)
        if kind is not None:
            _set_kind(gw, access.stream_id, kind)
        return _publish(gw, access, idempotency_key, encoded, end)

    return await run_in_threadpool(publish)


def _kind_of(entries: Sequence[EntryIn]) -> StreamKind | None:
    """The one stream kind a request's entries name (None: none names one); a 422 when
    they name two, since the kind is the stream's, not the entry's."""
    kinds = {kind for entry in entries if (kind := entry.get("kind"))}
    if len(kinds) > 1:
        raise HTTPException(422, f"entries name {len(kinds)} kinds ({', '.join(sorted(kinds))});"
                                 " a stream has one kind: send them to separate streams")
    return kinds.pop() if kinds else None


def _set_kind(gw: Gateway, stream_id: str, kind: StreamKind) -> None:
    """Set the stream's kind before its entries land, so a worker reads them as that kind."""
    try:
        gw.client.hset(StreamKeys.of(stream_id).meta, KIND_FIELD, kind)
    except redis.RedisError as exc:
        raise HTTPException(503, f"Redis is unavailable ({type(exc).__name__}); retry",
                            headers={"Retry-After": "2"}) from None


@router.post("/{stream_id}/end", response_model=Published,
             responses={401: {}, 403: {}, 422: {}, 503: {}})
def post_end(body: EndIn | None = Body(None), idempotency_key: IdempotencyKey = None,
             access: Access = Depends(require("publish")),
             gw: Gateway = Depends(gateway)) -> Published:
    """End the stream (the workers then publish the final notes). Idempotent without a key:
    a retried end adds no second end marker."""
    text = body.text if body else ""
    encoded = _encode([{"text": text}], gw.settings.max_entry_bytes) if text else []
    return _publish(gw, access, idempotency_key or "end", encoded, True)


@router.post("/{stream_id}/captions", response_model=Published,
             responses={401: {}, 403: {}, 413: {}, 415: {}, 422: {}, 503: {}},
             openapi_extra={"requestBody": {"content": {"text/vtt": {"schema": {
                 "type": "string"}}}, "required": True}})
async def post_captions(request: Request, idempotency_key: IdempotencyKey = None,
                        end: bool = Query(False, description="end the stream after these"),
                        access: Access = Depends(require("publish")),
                        gw: Gateway = Depends(gateway)) -> Published:
    """A caption webhook: a WebVTT document or a chunk of cues as they arrive
    (``Content-Type: text/vtt``). ``<v Name>`` sets the speaker, the cue start the ``ts``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("text/vtt", "text/plain"):
        raise HTTPException(415, "send WebVTT with Content-Type: text/vtt")
    raw = await request.body()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HTTPException(422, f"body is not UTF-8 (byte offset {exc.start})") from None
    if not text.lstrip().startswith("WEBVTT"):
        text = "WEBVTT\n\n" + text  # a chunk of cues without the file header
    try:
        turns = list(parse_vtt(text, "body"))
    except InputFormatError as exc:
        raise HTTPException(422, str(exc)) from None
    if not turns and not end:
        raise HTTPException(422, "no cues with text in the body")
    if len(turns) > gw.settings.gateway_max_batch_entries:
        raise HTTPException(413, f"{len(turns)} cues in one request, over the limit of "
                                 f"{gw.settings.gateway_max_batch_entries}")
    entries: list[EntryIn] = [{"text": t.text, "speaker": t.speaker, "ts": t.ts} for t in turns]
    checked = _encode(entries, gw.settings.max_entry_bytes)
    return await run_in_threadpool(_publish, gw, access, idempotency_key, checked, end)
