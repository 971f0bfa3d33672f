"""How sure the model was of an answer's boxes, from the log-probabilities of the tokens it generated.

A box's `score` is the probability the model gave the answer's first token (the choice between drawing
boxes and saying that there are none) times the geometric mean of the probabilities of the tokens that
spell the box (`[[x1, y1, x2, y2, angle]]`). It is read off the generated sequence after decoding, so it
holds for greedy and beam decoding alike (for beams, the kept beam's own steps).
"""

from __future__ import annotations

import math
from typing import Any

from earthdial.model.answers import parse_boxes

_OPEN, _CLOSE = "[[", "]]"


class Answer(str):
    """An answer's text that also carries its generated token ids and their log-probabilities."""

    ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    offsets: tuple[int, ...] = ()  # for each token, where its text ends in the decoded answer

    def box_scores(self) -> list[float]:
        """One score per box `answers.parse_boxes` finds in this text, in the same order."""
        boxes = parse_boxes(self)
        if not boxes:
            return []
        if not self.logprobs:
            return [float("nan")] * len(boxes)
        first = math.exp(self.logprobs[0])
        spans = _box_spans(self)
        out = []
        for k in range(len(boxes)):
            if k >= len(spans):
                out.append(first)
                continue
            start, end = spans[k]
            picked = [
                lp
                for lp, stop, begin in zip(self.logprobs, self.offsets, (0, *self.offsets), strict=False)
                if begin < end and stop > start
            ]
            mean = sum(picked) / len(picked) if picked else 0.0
            out.append(round(first * math.exp(mean), 4))
        return out


def _box_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the innermost `[..]` lists that hold numbers (one per box, in order)."""
    spans, start = [], -1
    for i, ch in enumerate(text):
        if ch == "[":
            start = i
        elif ch == "]" and start >= 0:
            if any(c.isdigit() for c in text[start:i]):
                spans.append((start, i + 1))
            start = -1
    return spans


def answers(engine: Any, out: Any, limits: list[int]) -> list[Answer]:
    """Decoded answers of one `generate` call (a dict output with scores), each with its tokens'
    log-probabilities."""
    sequences = out.sequences if hasattr(out, "sequences") else out
    logprobs = None
    if getattr(out, "scores", None):
        beams = getattr(out, "beam_indices", None)
        try:
            logprobs = (
                engine.model.compute_transition_scores(
                    sequences, out.scores, beams, normalize_logits=beams is None
                )
                .float()
                .tolist()
            )
        except Exception:  # an output transformers cannot score: answers without scores, never a failure
            logprobs = None
    result = []
    for row, (ids, limit) in enumerate(zip(sequences.tolist(), limits, strict=True)):
        ids = ids[len(ids) - len(out.scores) :] if logprobs is not None else ids  # the new tokens only
        ids = ids[:limit]
        end = next((i for i, tok in enumerate(ids) if tok in engine.stop_ids), len(ids))
        answer = Answer(engine.text_of(ids))
        if logprobs is not None and end:
            answer.ids = tuple(ids[:end])
            answer.logprobs = tuple(logprobs[row][:end])
            if _OPEN in answer:  # offsets cost a decode per token: only where there are boxes to score
                answer.offsets = _offsets(engine, answer.ids, str(answer))
        result.append(answer)
    return result


def _offsets(engine: Any, ids: tuple[int, ...], text: str) -> tuple[int, ...]:
    """Where each token's text ends in the decoded answer, by decoding growing prefixes (decoding a token
    alone loses the spaces some tokenizers attach to their neighbours)."""
    out, lead = [], None
    for k in range(1, len(ids) + 1):
        part = engine.tokenizer.decode(list(ids[:k]), skip_special_tokens=False)
        for tok in engine._strip:
            part = part.replace(tok, "")
        if lead is None:
            stripped = part.lstrip()
            lead = len(part) - len(stripped) if stripped else None
            part = stripped
        else:
            part = part[lead:]
        out.append(min(len(part), len(text)))
    return tuple(out)
