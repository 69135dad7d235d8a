"""`ctt-generate`: answer prompts with the learned token (or a fixed word, or none) and N forced continuations.

    python -m ctt.generate model=smollm2_135m token.path=FILE generate.prompt="What is 2+3?"
    python -m ctt.generate model=exported model.path=DIR generate.input=prompts.jsonl generate.output=out.jsonl

Prompts: `generate.prompt` (one), `generate.input` = a .txt file (one prompt per line), a .jsonl file (a `question`
or `prompt` field per row) or `-` (stdin, one prompt per line), read as strict UTF-8 (ctt.text); every
prompt is checked (its length, its text) before the first is answered, an error naming its `file:line`. Output: stdout (each completion streamed as it is
generated, every inserted continuation marked; then its extracted answer and counts), or `generate.output=FILE.jsonl`
(one `ctt.api.Completion` record per prompt, collected as each batch finishes, then written to a temp sibling and
renamed into place at the end: a kill or an error leaves the earlier file whole; an input, or a file ctt-generate did not write, is
refused, and so is a second writer: `ctt.outputs`). Thinking and answer budgets come from
the `forcing` group, as in evaluation. Built on the Python API, `ctt.api.ContinueThinking`.
"""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning as L
from omegaconf import DictConfig

from ctt.api import Completion, ContinueThinking
from ctt.config.hydra_glue import ctt_main
from ctt.settings import to_plain
from ctt.errors import ConfigError, CttError, DataError
from ctt.text import check_text, json_line, jsonl_rows, read_lines
from ctt.config.check import validate_config
from ctt.outputs import atomic_open, check_not_input, clean_siblings, check_output_file, hold_output, make_folder
from ctt.settings import MAX_CONTINUATIONS, Settings, require, require_size, require_temperature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateSettings(Settings):
    """The `generate` config group."""

    section: ClassVar[str] = "generate"

    mode: str = "learned"
    num_continuations: int = 2
    prompt: str | None = None
    input: str | None = None
    output: str | None = None
    stream: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    marks: list[str] = ("[[", "]]")

    def check(self) -> None:
        if (self.prompt is None) == (self.input is None):
            raise ConfigError("give generate.prompt=TEXT or generate.input=FILE (.txt, .jsonl, or - for stdin), "
                              "not both and not neither")
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise ConfigError(f"generate.prompt must be a non-empty text, got {self.prompt!r}")
        if self.output is not None and not str(self.output).endswith(".jsonl"):
            raise ConfigError(f"generate.output must be a .jsonl file (or null for stdout), got {self.output!r}")
        require_size(self.num_continuations, "generate.num_continuations", 0, MAX_CONTINUATIONS)
        require_temperature(self.temperature, "generate.temperature", greedy_ok=True)
        require(0 < self.top_p <= 1, "generate.top_p", "a number in (0, 1]", self.top_p)
        require(len(self.marks) == 2, "generate.marks", "two texts", self.marks)


def read_prompts(settings: GenerateSettings) -> list[tuple[str, str]]:
    """(where, prompt) for every prompt: `generate.prompt`, or `file:line` / `stdin:line` (1-based, counting blank
    lines) of each non-blank line or JSONL row (ctt.text: strict UTF-8, no lone surrogates)."""
    if settings.prompt is not None:
        return [("generate.prompt", check_text(settings.prompt, "generate.prompt"))]
    source = str(settings.input)
    if source.endswith(".jsonl"):
        prompts = [(where, _jsonl_prompt(where, row)) for where, row in jsonl_rows(source)]
    elif source == "-" or source.endswith(".txt"):
        prompts = [(where, line.strip()) for where, line in read_lines(source)]
    else:
        raise ConfigError(f"generate.input must be a .txt or .jsonl file or - (stdin), got {source!r}")
    prompts = [(where, p) for where, p in prompts if p]
    if not prompts:
        raise DataError(f"no prompts in {'stdin' if source == '-' else source}")
    return prompts


def _jsonl_prompt(where: str, row) -> str:
    text = row.get("question", row.get("prompt")) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: expected a JSON object with a non-empty 'question' or 'prompt' text")
    return text


def _footer(c: Completion) -> str:
    return (f"\n--- answer: {c.answer} | continuations inserted: {c.forced}/{c.num_continuations} | thinking tokens: "
            f"{c.thinking_tokens} | answer tokens: {c.answer_tokens} | stop: {c.stop_reason}\n")


def run(ct: ContinueThinking, s: GenerateSettings, prompts: list[str], seed: int) -> list[Completion]:
    kwargs = dict(mode=s.mode, num_continuations=s.num_continuations, temperature=s.temperature, top_p=s.top_p,
                  seed=seed)
    out: list[Completion] = []
    if s.output is None:
        for i, prompt in enumerate(prompts, start=1):
            sys.stdout.write(f"=== [{i}/{len(prompts)}] {prompt}\n")
            if s.stream:
                c = ct.stream(prompt, _write_stdout, **kwargs)
            else:
                (c,) = ct.generate([prompt], **kwargs)
                sys.stdout.write(c.completion)
            sys.stdout.write(_footer(c))
            out.append(c)
        return out
    path = Path(s.output)
    make_folder(path.parent)
    with hold_output(path, "generate.output"):
        clean_siblings(path)  # temp files of killed runs
        out = _write_records(ct, prompts, kwargs, path)
    log.info("%d completions written to %s", len(out), path)
    return out


def _write_records(ct: ContinueThinking, prompts: list[str], kwargs: dict, path: Path) -> list[Completion]:
    out, size = [], ct.policy.settings.batch_size
    with atomic_open(path) as f:  # renamed into place when every record is written
        for start in range(0, len(prompts), size):
            batch = ct.generate(prompts[start : start + size], **kwargs)
            f.writelines(json_line(c.to_dict()) for c in batch)
            out += batch
    return out


def is_generate_output(path: Path) -> bool:
    """A file ctt-generate wrote (what `generate.output` may replace): EVERY line is a completion record, so a line
    a user appended, or a file that only starts like ours, is never replaced."""
    keys = {"prompt", "completion", "num_continuations"}
    try:
        return all(isinstance(row, dict) and keys <= set(row) for _, row in jsonl_rows(path))
    except CttError:  # unreadable, not UTF-8, a line that is not JSON
        return False


def claim_output(s: GenerateSettings):
    """Check `generate.output` and own it before any prompt is read: not an input, not a file ctt-generate did not
    write, one writer at a time (ctt.outputs)."""
    if s.output is None:
        return nullcontext()
    check_not_input(s.output, {"generate.input": s.input})
    check_output_file(s.output, "generate.output", is_generate_output)
    make_folder(Path(s.output).parent)
    return hold_output(s.output, "generate.output")


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@ctt_main("generate")  # hydra.main, a missing option one line (ctt.config.hydra_glue)
def main(cfg: DictConfig) -> None:
    from ctt.errors import exit_for_user_error

    try:
        validate_config(cfg)  # every group typed and checked before anything is loaded (ctt.config.check)
        L.seed_everything(cfg.seed, verbose=False)  # after: a seed of -1 or "abc" is the check's one line
        settings = GenerateSettings.from_config(to_plain(cfg.generate))
        if settings.output is None and sys.stdout is None:  # started with stdout closed (`>&-`): Python sets None
            raise ConfigError("stdout is closed and generate.output is not set: nowhere to write the completions "
                              "(give generate.output=FILE.jsonl)")
        with claim_output(settings):
            named = read_prompts(settings)
            ct = ContinueThinking.from_config(cfg)
            ct.mode(settings.mode, settings.num_continuations, "generate.mode")  # a bad mode fails before generating
            ct.check(named)  # every prompt fits the context, named by its line, before the first is answered
            run(ct, settings, [p for _, p in named], cfg.seed)
    except Exception as err:
        exit_for_user_error(err, log, "generation")


if __name__ == "__main__":
    main()
