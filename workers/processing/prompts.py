"""What the model is asked, and what a published summary looks like.

Summaries are generated from a *copy* of a stream's state: the stream's memory already holds the
transcript (sinks + recent window, or the RWKV state), so a summary costs only the prompt and
the new tokens, never a re-read of the transcript.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Section:
    """One section of the final meeting notes, generated with its own short prompt.

    ``lead`` pre-fills the assistant's answer (``"-"`` for a list), which a 135M model
    follows far better than a multi-part instruction. No trailing space: BPE vocabularies
    attach the space to the next word, and a lead of ``"- "`` made SmolLM2 continue with word
    pieces ("- rd person ...").
    """

    title: str
    instruction: str
    lead: str = ""
    bullets: bool = True


#: the sections people expect from meeting notes, in the order they are printed;
#: ``{meeting}`` is "the meeting above", or with summary memory "the whole meeting"
SECTIONS = (
    Section("Summary", "Summarize {meeting} in three sentences.", "The meeting",
            bullets=False),
    Section("Decisions", "List the decisions made in {meeting}, one per line.", "-"),
    Section("Action items", "List the action items from {meeting}, one per line, each with "
                            "the name of the person who owns it.", "-"),
    Section("Open questions", "List the questions {meeting} left open, one per line.", "-"),
)
#: most items kept in a list section, and characters in the summary section
MAX_SECTION_ITEMS = 6


def section_instruction(
    section: Section, previous: str | None, key_lines: Sequence[str] = ()
) -> str:
    """A final-notes section's instruction, after what the stream's memory holds of the
    earlier meeting: its key moments (the speakers' own words, ``Speaker: text``) when there
    are any, else the previous summary.

    The key moments cover the whole stream and cannot drift; a small model's folded summary
    does, and a prompt carrying both is long enough to derail it: on QMSum with SmolLM2-135M
    the key moments alone gave the best notes of the three (``benchmarks/README.md``).
    """
    if key_lines:
        head = "Key moments of the whole meeting:\n" + _notes("\n".join(key_lines))
    elif previous:
        head = f"Earlier in the meeting: {_notes(previous)}"
    else:
        return section.instruction.format(meeting="the meeting above")
    return head + "\n\n" + section.instruction.format(
        meeting="the whole meeting, the earlier part and the conversation above")


def tidy_section(section: Section, generated: str) -> str:
    """The generated section body, cut to what belongs to it: small models go on to the next
    section or loop, so a list keeps its first distinct ``- `` items and prose its first
    paragraph."""
    text = (section.lead + generated).strip()
    if not section.bullets:
        return first_paragraph(text)
    items: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            if items:
                break
            continue
        if not line.startswith(("-", "*", "•")) and not line[:1].isdigit():
            if items:
                break
            continue
        item = line.lstrip("-*•0123456789.) ").strip()
        if item and item.lower() not in {i.lower() for i in items}:
            items.append(item)
        if len(items) >= MAX_SECTION_ITEMS:
            break
    return "\n".join(f"- {i}" for i in items) if items else "- none noted"


def first_paragraph(text: str) -> str:
    """Prose cut at its first blank line: a small model that has answered goes on to invent
    a next turn ("What happened next..."), a heading or another question."""
    return text.strip().split("\n\n")[0].strip()


#: an answer keeps at most this many sentences of what the model wrote
ANSWER_SENTENCES = 2
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def short_answer(text: str) -> str:
    """The model's answer cut to its first ``ANSWER_SENTENCES`` sentences (of its first
    paragraph): asked for a short answer, a small model gives one and then keeps going into
    invented detail; the evidence that matters is cited apart (``sources``, with the
    quoted line)."""
    sentences = _SENTENCE_END.split(first_paragraph(text))
    return " ".join(sentences[:ANSWER_SENTENCES]).strip()


def format_notes(sections: Sequence[tuple[Section, str]]) -> str:
    """Meeting notes as markdown: one ``## Title`` per section."""
    return "\n\n".join(f"## {s.title}\n{body}" for s, body in sections)


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
