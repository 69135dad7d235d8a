"""Streaming a budget-forced rollout as text while it is generated, inserted continuations marked.

Plugs into `generate_forced(on_token=...)`. The text written is exactly `Policy.render` of the finished rollout:
the same segments (text, marked continuation, text, ...), each decoded from its own start. Decoding word by word is
transformers' `TextStreamer`; what is ours is knowing which tokens are final: while thinking, the last k-1 tokens
could still turn out to be the start of a k-token end-of-thinking marker, which the engine removes, so they are held
back until the next token (or the end of thinking) settles them.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from ctt.engine import ForcingConfig, Rollout


class _Words(TextStreamer):
    """transformers' TextStreamer handing its text to `write`, with no line end of its own at `end()`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, write: Callable[[str], object]):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=False)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.write(text)


class RolloutStreamer:
    """`on_token` callback for ONE rollout (batch of one): writes its final text as it grows; call `finish` at the
    end. `marks` wrap every inserted continuation, as `Policy.render` does."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, forcing: ForcingConfig, write: Callable[[str], object],
        marks: tuple[str, str] = ("[[", "]]"),
    ):
        self.k, self.width = len(forcing.end_of_thinking_ids), len(forcing.continuation_ids)
        self.words, self.write = _Words(tokenizer, write), write
        self.open, self.close = marks
        self.done = 0  # completion tokens written
        self.continuation_end: int | None = None  # inside a marked continuation: where it ends
        self.marked: set[int] = set()  # continuation starts already marked

    def __call__(self, index: int, rollout: Rollout) -> None:
        settled = rollout.answer_start is not None or bool(rollout.stop_reason)  # thinking over: nothing is removed
        self._write_until(rollout, len(rollout.completion_ids) - (0 if settled else self.k - 1))

    def finish(self, rollout: Rollout) -> None:
        self._write_until(rollout, len(rollout.completion_ids))
        self.words.end()

    def _write_until(self, rollout: Rollout, final: int) -> None:
        starts = set(rollout.continuation_starts)
        while True:
            i = self.done
            if self.continuation_end == i:
                self.words.end()
                self.write(self.close)
                self.continuation_end = None
            if self.continuation_end is None and i in starts and i not in self.marked:
                self.marked.add(i)
                self.words.end()  # a segment ends here: flush it, decoded as a whole like Policy.render does
                self.write(self.open)
                if self.width:
                    self.continuation_end = i + self.width
                else:
                    self.write(self.close)  # "no string": an empty mark where the marker was dropped
                continue
            if i >= final:
                return
            self.words.put(torch.tensor([rollout.completion_ids[i]]))
            self.done += 1
