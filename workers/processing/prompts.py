"""What the model is asked, and what a published summary looks like.

Summaries are generated from a *copy* of a stream's state: the stream's memory already holds the
transcript (sinks + recent window, or the RWKV state), so a summary costs only the prompt and
the new tokens, never a re-read of the transcript.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from workers.engines.base import Sampling

# Short, single-task instructions: small instruct models (SmolLM2-135M) follow these and
# ramble on long multi-part ones (checked by hand on the demo transcript).
ROLLING_INSTRUCTION = (
    "Summarize the conversation above in three sentences. Mention who does what."
)
FINAL_INSTRUCTION = (
    "The meeting is over. Write short meeting notes for the conversation above: what was "
    "decided, who does what, and what is still open."
)
#: sampling for summaries: greedy, with a penalty that keeps small models from looping and
#: from copying their notes
SUMMARY_SAMPLING = Sampling(repetition_penalty=1.3, penalize_prompt=True)
#: sampling for answers: the same, but free to reuse the words of the question and excerpts
ANSWER_SAMPLING = Sampling(repetition_penalty=1.3)


def answer_instruction(question: str) -> str:
    return (f"Answer this question about the conversation above in one or two short "
            f"sentences: {question}")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


# ----- whole-stream memory (issue #8) ---------------------------------------------------------
#: how much of the previous summary a prompt carries (characters; a runaway summary from a
#: small model must not crowd the window out of the next prompt)
MAX_NOTES_CHARS = 1500


def rolling_instruction(previous: str | None) -> str:
    """The rolling-summary instruction, folding in the previous summary when there is one.

    The previous summary covers text that may have left the window; asking for a summary of
    "the earlier part and the conversation above" carries the whole stream forward in a
    bounded prompt. (Tried by hand on SmolLM2-135M: "update these notes" made it describe the
    notes - "The previous note mentions..." - and notes placed after the request were
    ignored; notes first, then one request naming both parts, worked best.)
    """
    if not previous:
        return ROLLING_INSTRUCTION
    return (f"Earlier in the conversation: {_notes(previous)}\n\n"
            "Summarize the whole conversation so far, the earlier part and the conversation "
            "above, in four sentences. Mention who does what.")


#: the final notes' prose section: generated, then checked by the guard; the items' sections
#: (decisions, action items, open questions) come from ``workers.notes``
SUMMARY_TITLE = "Summary"
SUMMARY_LEAD = "The meeting"
SUMMARY_INSTRUCTION = "Summarize {meeting} in three sentences."
#: sampling for phrasing an item from its own lines: free to copy their words (names, numbers
#: and dates should come from the lines), a light penalty against loops
PHRASE_SAMPLING = Sampling(repetition_penalty=1.1)


def summary_instruction(previous: str | None, key_lines: Sequence[str] = (),
                        items: Sequence[str] = ()) -> str:
    """The final notes' summary instruction, after what the stream's memory holds of the whole
    meeting: its decisions and action items (``items``, already checked against their lines)
    and its key moments (the speakers' own words) when there are any, else the previous
    rolling summary.

    Key moments cover the whole stream and cannot drift; a small model's folded summary does
    (on QMSum with SmolLM2-135M the key moments alone gave better notes than the folded
    summary, and than both together: ``benchmarks/README.md``).
    """
    parts = []
    if items:
        parts.append("Notes of the whole meeting:\n" + _notes("\n".join(items)))
    if key_lines:
        parts.append("Key moments of the whole meeting:\n" + _notes("\n".join(key_lines)))
    elif previous and not items:
        parts.append(f"Earlier in the meeting: {_notes(previous)}")
    if not parts:
        return SUMMARY_INSTRUCTION.format(meeting="the meeting above")
    return "\n\n".join(parts) + "\n\n" + SUMMARY_INSTRUCTION.format(
        meeting="the whole meeting, the earlier part and the conversation above")


def whole_sentences(text: str, limit: int | None = None) -> str:
    """Prose cut to its first paragraph and to whole sentences (a generation stopped by its
    token budget mid-sentence loses that sentence; a sentence that announces a list, ending
    with ":", goes too: the list never came), at most ``limit`` sentences."""
    paragraph = first_paragraph(text)
    sentences = [s for s in _SENTENCE_END.split(paragraph) if s.strip()]
    while sentences and not re.search(r"[.!?][\"')\]]*$", sentences[-1].strip()):
        sentences.pop()
    if limit is not None:
        sentences = sentences[:limit]
    return " ".join(s.strip() for s in sentences).strip()


def first_paragraph(text: str) -> str:
    """Prose cut at its first blank line: a small model that has answered goes on to invent
    a next turn ("What happened next..."), a heading or another question."""
    return text.strip().split("\n\n")[0].strip()


#: an answer keeps at most this many sentences of what the model wrote
ANSWER_SENTENCES = 2


def short_answer(text: str) -> str:
    """The model's answer cut to its first ``ANSWER_SENTENCES`` sentences (of its first
    paragraph): asked for a short answer, a small model gives one and then keeps going into
    invented detail; the evidence that matters is cited apart (``sources``, with the
    quoted line)."""
    sentences = _SENTENCE_END.split(first_paragraph(text))
    return " ".join(sentences[:ANSWER_SENTENCES]).strip()


def context_block(lines: Sequence[str]) -> str:
    """Retrieved lines that left the window, verbatim, in the order they were said. No
    labels: where each came from is cited in the answer's ``sources``; in the prompt, labels
    were more text between a small model and the question."""
    return "Earlier parts of the conversation, no longer above:\n\n" + "\n".join(
        line.strip() for line in lines)


def answer_with_context_instruction(
    question: str, context: str = "", notes: str | None = None
) -> str:
    """The answer instruction, after the retrieved ``context`` and the summary-memory
    ``notes`` when there are any (both come after the window, in the same user turn)."""
    head = f"Earlier in the conversation: {_notes(notes)}\n\n" if notes else ""
    if not context:
        return head + answer_instruction(question)
    return (f"{head}{context}\n\nQuestion: {question}\nAnswer in one or two short sentences, "
            "using the conversation above and the earlier parts.")


def _notes(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_NOTES_CHARS else text[:MAX_NOTES_CHARS].rsplit(" ", 1)[0]


def format_turn(text: str, speaker: str | None) -> str:
    """How one input entry enters the model: ``Speaker: text`` on its own line."""
    text = text.strip()
    return f"{speaker}: {text}\n" if speaker else f"{text}\n"


def rolling_summary_due(tokens_before: int, tokens_after: int, every: int) -> bool:
    """True when this batch crossed a multiple of ``every`` tokens (0 disables)."""
    return every > 0 and tokens_after // every > tokens_before // every
