"""Build the offline lm-eval task `pydoc_next_sentence` from CPython's own help text.

Each item is a sentence (with the one before it, when there is one) from a `pydoc_data.topics` help page; the
model picks the real next sentence among four: the true one and three sentences of similar length drawn from
other help topics. Real English prose, about Python, needs no hub, and is deterministic for a given CPython
version (the topics text changes between versions, so the JSONL is checked in and records its source version).

Run:  python scripts/build_pydoc_task.py   (rewrites nas_minitron/tasks/pydoc_next_sentence/pydoc_next_sentence.jsonl)
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

NUM_CHOICES = 4
NUM_FEWSHOT_ITEMS = 30  # "train" split: the few-shot examples, never scored
MAX_ITEMS_PER_TOPIC = 6
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "nas_minitron/tasks/pydoc_next_sentence/pydoc_next_sentence.jsonl"

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Za-z\"'(][^*=|]*[.!?]$")


def prose_paragraphs(text: str) -> list[str]:
    """Unindented paragraphs of running text: code, grammar rules, tables and headings are left out."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(not line or line[0].isspace() for line in lines):
            continue  # indented: code, grammar or a nested list
        joined = " ".join(line.strip() for line in lines)
        if ">>>" in joined or "::" in joined or not _PROSE.match(joined):
            continue
        paragraphs.append(joined)
    return paragraphs


def good_sentence(sentence: str) -> bool:
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return 40 <= len(sentence) <= 220 and letters >= 0.85 * len(sentence)


def sentence_pairs(topics: dict[str, str]) -> list[tuple[str, str, str]]:
    """(topic, context, next sentence) for consecutive sentences inside one prose paragraph."""
    pairs = []
    for topic in sorted(topics):
        found = []
        for paragraph in prose_paragraphs(topics[topic]):
            sentences = _SENTENCE_END.split(paragraph)
            for i in range(1, len(sentences)):
                if good_sentence(sentences[i - 1]) and good_sentence(sentences[i]):
                    context = " ".join(sentences[max(0, i - 2) : i])
                    found.append((topic, context, sentences[i]))
        # Evenly spaced picks so that one long topic does not dominate.
        step = max(1, len(found) // MAX_ITEMS_PER_TOPIC)
        pairs.extend(found[::step][:MAX_ITEMS_PER_TOPIC])
    return pairs


def build_items(topics: dict[str, str]) -> list[dict[str, object]]:
    """Items with context, four choices (one real), the label, topic and split; deterministic."""
    rng = random.Random(SEED)
    pairs = sentence_pairs(topics)
    pool = [(topic, target) for topic, _, target in pairs]
    items = []
    for topic, context, target in pairs:
        similar = [s for t, s in pool if t != topic and s != target and 0.6 <= len(s) / len(target) <= 1.6]
        distractors = rng.sample(sorted(set(similar)), NUM_CHOICES - 1)
        label = rng.randrange(NUM_CHOICES)
        choices = distractors[:label] + [target] + distractors[label:]
        items.append({"topic": topic, "context": context, "choices": choices, "label": label})
    rng.shuffle(items)
    for index, item in enumerate(items):
        item["split"] = "train" if index < NUM_FEWSHOT_ITEMS else "test"
        item["id"] = index
    return items


def main() -> int:
    from pydoc_data.topics import topics

    items = build_items(topics)
    with OUT.open("w") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")
    num_test = sum(item["split"] == "test" for item in items)
    python = ".".join(map(str, sys.version_info[:3]))
    print(f"wrote {len(items)} items ({num_test} test, {len(items) - num_test} few-shot) from Python {python}'s "
          f"pydoc topics to {OUT}; record that version in the task YAML's metadata.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
