"""Coverage-guided fuzzing (atheris) of the two parsers that read bytes from Redis.

``python -m tests.integration.chaos.fuzz_atheris -runs=N`` (any libFuzzer flags:
``-max_total_time=S``):

* ``state_store.codec.decode_state`` on arbitrary bytes, on mutations of a valid encoded
  state, and on mutated msgpack bodies re-sealed with a correct header and checksum: it
  returns an envelope or raises ``StateError``, nothing else, ever (no crash, no other
  exception, no unbounded allocation: sizes are checked before allocating);
* ``sinkstream.contracts.entries.parse_entry`` on arbitrary field maps: it returns an
  ``InputEntry`` or a ``Rejected``, never raises.

``tests/integration/chaos/test_fuzz.py`` runs a short bounded pass in CI; ``benchmarks/chaos.py``
(soak) a longer one. Complements the hypothesis properties in
``tests/unit/state_store/test_codec.py``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["producer", "state_store"]):
    from sinkstream.contracts.entries import InputEntry, Rejected, parse_entry
    from state_store.codec import (
        HEADER_SIZE,
        StateEnvelope,
        StateError,
        decode_state,
        encode_state,
        seal,
    )
    from state_store.tensors import RawTensor, StateSnapshot

_SEED_STATE = encode_state(StateEnvelope(
    engine="sinkkv", fingerprint="ab" * 32,
    params={"sink_tokens": 4, "recent_tokens": 16, "chunk_tokens": 4, "dtype": "float32"},
    tokens_seen=12, last_entry_id="1700000000000-3",
    snapshot=StateSnapshot(
        tensors={"k": RawTensor("float32", (2, 3), bytes(range(24))),
                 "slots": RawTensor("int64", (3,), bytes(24))},
        scalars={"pending": [1, 2], "tokens_seen": 12}),
))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 3:  # a hostile msgpack body, correctly sealed: reaches the envelope checks
        body = bytearray(_SEED_STATE[HEADER_SIZE:])
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            body[fdp.ConsumeIntInRange(0, len(body) - 1)] = fdp.ConsumeInt(1) & 0xFF
        _decode(seal(bytes(body[: fdp.ConsumeIntInRange(0, len(body))])))
    elif choice == 0:
        _decode(fdp.ConsumeBytes(fdp.remaining_bytes()))
    elif choice == 1:  # flip bytes of a valid state: deep paths, not just the magic check
        blob = bytearray(_SEED_STATE)
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            blob[fdp.ConsumeIntInRange(0, len(blob) - 1)] = fdp.ConsumeInt(1) & 0xFF
        _decode(bytes(blob[: fdp.ConsumeIntInRange(0, len(blob))]))
    else:
        fields: dict[bytes, bytes] = {}
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            name = fdp.PickValueInList([b"text", b"speaker", b"ts", b"eos", b"x"])
            fields[name] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        parsed = parse_entry(b"1-1", fields, max_text_bytes=fdp.ConsumeIntInRange(0, 64))
        assert isinstance(parsed, InputEntry | Rejected)


def _decode(blob: bytes) -> None:
    try:
        decode_state(blob, stream_id="fuzz", max_bytes=1 << 20)
    except StateError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
