"""Hand-made ground truth for meeting notes (decisions, action items, open questions).

``benchmarks/data/notes_labels/<meeting>.json`` holds, per meeting, what a careful note-taker
would put in the minutes, each item pointing at the turns that state it with a short verbatim
quote (schema and method: ``benchmarks/data/notes_labels/README.md``). The transcripts are not
copied: QMSum meetings are read from ``../shared/data/qmsum/val`` as ``benchmarks/qmsum.py``
reads them (``SINKSTREAM_DATA_DIR`` moves the shared data folder; ``--data DIR`` names the QMSum
val folder itself, as in ``benchmarks/qmsum.py``, or a data folder holding ``qmsum/val``), the
demo meeting from ``sinkstream/samples/launch-review.vtt`` in the repository.

``python -m benchmarks.notes_labels [NAME ...] [--data DIR]`` checks every label file (or the
named ones): the schema, that every cited turn exists, that each evidence quote occurs in one
of its cited turns (whitespace normalised, nothing else) and that owners are speakers of the
meeting. It exits 1 if anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, DATA_DIR

LABELS_DIR = BENCH_DIR / "data" / "notes_labels"
REPO_DIR = BENCH_DIR.parent

#: the three kinds of note, each a list of items
KINDS = ("decisions", "action_items", "open_questions")
TOP_KEYS = {"meeting", "source", "turn_index_base", "notes", *KINDS}
ITEM_KEYS = {
    "decisions": {"text", "turns", "evidence"},
    "action_items": {"text", "owner", "due", "turns", "evidence"},
    "open_questions": {"text", "turns", "evidence"},
}
#: ``owner`` of a task given to everyone present (otherwise a speaker of the meeting, or null)
OWNER_ALL = "all"
QMSUM_PREFIX = "qmsum/val/"


def load_labels(name: str, labels_dir: Path = LABELS_DIR) -> dict[str, Any]:
    """The labels of one meeting (``name`` as in the file name: ``ES2006a``,
    ``launch-review``)."""
    path = labels_dir / f"{name}.json"
    with path.open(encoding="utf-8") as f:
        labels: dict[str, Any] = json.load(f)
    return labels


def label_names(labels_dir: Path = LABELS_DIR) -> list[str]:
    """Every labelled meeting, sorted."""
    return sorted(p.stem for p in labels_dir.glob("*.json"))


def default_data_dir() -> Path:
    """``benchmarks.common.DATA_DIR`` (``../shared/data`` or ``SINKSTREAM_DATA_DIR``); from a
    linked git worktree whose parent has no ``shared/data``, the one next to the main
    checkout."""
    if DATA_DIR.is_dir():
        return DATA_DIR
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return DATA_DIR
    candidate = Path(common).parent.parent / "shared" / "data"
    return candidate if candidate.is_dir() else DATA_DIR


def qmsum_dir(data: Path) -> Path:
    """The QMSum val folder: ``data/qmsum/val`` when ``data`` is a shared data folder, else
    ``data`` itself."""
    nested = data / "qmsum" / "val"
    return nested if nested.is_dir() else data


def normalise(text: str) -> str:
    """Runs of whitespace -> one space, ends stripped (the only normalisation evidence gets)."""
    return re.sub(r"\s+", " ", text).strip()


def meeting_turns(source: str, data_dir: Path) -> list[tuple[str | None, str]]:
    """(speaker, text) of every turn of a label file's ``source``, in order.

    QMSum: ``meeting_transcripts`` as stored, blank turns included (the producer's QMSum reader
    skips those, so a published turn's index can be lower). VTT: the turns the producer's
    reader makes of the file (one per cue for the demo meeting).
    """
    if source.startswith(QMSUM_PREFIX):
        path = qmsum_dir(data_dir) / source[len(QMSUM_PREFIX) :]
        doc = json.loads(path.read_text(encoding="utf-8"))
        return [(t.get("speaker"), t["content"]) for t in doc["meeting_transcripts"]]
    from producer.formats import read_file

    return [(t.speaker, t.text) for t in read_file(REPO_DIR / source)]


def _check_item(
    kind: str,
    i: int,
    item: Any,
    turns: list[tuple[str | None, str]] | None,
    speakers: set[str],
) -> list[str]:
    where = f"{kind}[{i}]"
    if not isinstance(item, dict):
        return [f"{where}: not an object"]
    errors = []
    keys = set(item)
    if keys != ITEM_KEYS[kind]:
        missing, extra = ITEM_KEYS[kind] - keys, keys - ITEM_KEYS[kind]
        errors.append(f"{where}: keys missing {sorted(missing)}, unexpected {sorted(extra)}")
    for key in ("text", "evidence"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            errors.append(f"{where}: {key!r} must be a non-empty string")
    cited = item.get("turns")
    if (
        not isinstance(cited, list)
        or not cited
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in cited)
    ):
        return [*errors, f"{where}: 'turns' must be a non-empty list of integers"]
    if cited != sorted(set(cited)):
        errors.append(f"{where}: 'turns' must be ascending without repeats")
    if kind == "action_items":
        owner, due = item.get("owner"), item.get("due")
        if owner is not None and (not isinstance(owner, str) or not owner.strip()):
            errors.append(f"{where}: 'owner' must be a non-empty string or null")
        elif owner is not None and turns is not None and owner not in speakers | {OWNER_ALL}:
            errors.append(f"{where}: owner {owner!r} is not a speaker of the meeting")
        if due is not None and (not isinstance(due, str) or not due.strip()):
            errors.append(f"{where}: 'due' must be a non-empty string or null")
    if turns is None:
        return errors
    out_of_range = [t for t in cited if not 0 <= t < len(turns)]
    if out_of_range:
        errors.append(f"{where}: turns {out_of_range} out of range (0..{len(turns) - 1})")
    evidence = item.get("evidence")
    if isinstance(evidence, str) and evidence.strip():
        quote = normalise(evidence)
        found = any(quote in normalise(turns[t][1]) for t in cited if 0 <= t < len(turns))
        if not found:
            errors.append(f"{where}: evidence {evidence!r} not found in turns {cited}")
    return errors


def check_labels(name: str, data_dir: Path, labels_dir: Path = LABELS_DIR) -> list[str]:
    """Everything wrong with one label file (empty: it passes)."""
    try:
        labels = load_labels(name, labels_dir)
    except (OSError, json.JSONDecodeError) as exc:
        return [f"cannot read: {exc}"]
    if not isinstance(labels, dict):
        return ["not a JSON object"]
    errors = []
    keys = set(labels)
    if keys != TOP_KEYS:
        errors.append(
            f"keys missing {sorted(TOP_KEYS - keys)}, unexpected {sorted(keys - TOP_KEYS)}"
        )
    if labels.get("meeting") != name:
        errors.append(f"'meeting' is {labels.get('meeting')!r}, the file name says {name!r}")
    if labels.get("turn_index_base") != 0:
        errors.append("'turn_index_base' must be 0")
    if not isinstance(labels.get("notes"), str):
        errors.append("'notes' must be a string")
    source = labels.get("source")
    turns: list[tuple[str | None, str]] | None = None
    if not isinstance(source, str) or not source:
        errors.append("'source' must be a path")
    else:
        try:
            turns = meeting_turns(source, data_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            errors.append(f"cannot read the transcript {source!r}: {exc}")
    speakers = {s for s, _ in turns or [] if s}
    for kind in KINDS:
        items = labels.get(kind)
        if not isinstance(items, list):
            errors.append(f"{kind!r} must be a list")
            continue
        texts = [normalise(it.get("text", "")).lower() for it in items if isinstance(it, dict)]
        if len(set(texts)) != len(texts):
            errors.append(f"{kind}: the same text twice")
        for i, item in enumerate(items):
            errors.extend(_check_item(kind, i, item, turns, speakers))
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="meetings to check (default: every label file)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="QMSum val folder, or a data folder holding qmsum/val (default: "
        "../shared/data/qmsum/val; SINKSTREAM_DATA_DIR moves ../shared/data)",
    )
    args = parser.parse_args(argv)
    data_dir = args.data or default_data_dir()
    names = args.names or label_names()
    if not names:
        print(f"no label files under {LABELS_DIR}")
        return 1
    print(f"labels: {LABELS_DIR}\nqmsum:  {qmsum_dir(data_dir)}")
    failed = 0
    totals = dict.fromkeys(KINDS, 0)
    for name in names:
        errors = check_labels(name, data_dir)
        if errors:
            failed += 1
            print(f"FAIL {name}")
            for error in errors:
                print(f"  - {error}")
            continue
        labels = load_labels(name)
        counts = {kind: len(labels[kind]) for kind in KINDS}
        for kind in KINDS:
            totals[kind] += counts[kind]
        print(
            f"ok   {name:<14} {counts['decisions']:>2} decisions  "
            f"{counts['action_items']:>2} action items  "
            f"{counts['open_questions']:>2} open questions  ({labels['source']})"
        )
    print(
        f"{len(names) - failed}/{len(names)} files pass; "
        f"{totals['decisions']} decisions, {totals['action_items']} action items, "
        f"{totals['open_questions']} open questions in the passing files"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
