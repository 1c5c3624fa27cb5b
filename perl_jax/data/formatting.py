"""Prompt formatting: the tokenizer's chat template, or a plain text template.

``data.prompt_format`` picks one of `FORMATS`:

* ``"plain"``: the prompt is ``data.prompt_template`` with ``{prompt}`` replaced by the record's
  prompt text (the default template ``"{prompt}"`` leaves it as it is). Published datasets
  already carry their plain layout (HH's ``"\\n\\nHuman: ...\\n\\nAssistant:"``, TL;DR's
  ``"SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:"``) and responses that start with a
  space (`perl_jax.data.published`), so prompt + response reads as the original text.
* ``"chat"``: the prompt is the tokenizer's chat template (``apply_chat_template`` with the
  generation prompt) over the record's ``context`` turns (published conversations, e.g. HH's
  Human/Assistant turns as user/assistant messages) or, without one (JSONL records), one user
  message holding the prompt text. Responses are stripped of surrounding whitespace: the
  template, not a space, separates them from the prompt. A template that writes the BOS token
  itself loses it again when the tokenizer adds one when encoding, so prompts never start with
  two BOS tokens.
* ``"auto"`` (default): ``"chat"`` when the tokenizer has a chat template, else ``"plain"``.

Formatting happens before tokenizing, so ``data.truncate`` (error, or keep the last
``data.max_prompt_len`` tokens) applies to the formatted prompt, template tokens included.
"""

from __future__ import annotations

import string
from typing import Any, Mapping, Sequence

from perl_jax.data.jsonl import DataError, Record, check_record
from perl_jax.tokenizers import TokenizerError

FORMATS = ("auto", "chat", "plain")
RESPONSE_KEYS = ("response", "chosen", "rejected")


def check_template(template: str) -> None:
  """Raises ValueError unless `template` is a format string whose only field is ``{prompt}``."""
  try:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
  except ValueError as e:
    raise ValueError(f"{template!r} is not a valid format string ({e}); write literal braces "
                     "as {{ and }}") from None
  if fields != {"prompt"}:
    raise ValueError(f"{template!r} must contain {{prompt}} and no other field (found: "
                     f"{', '.join(sorted(fields)) or 'none'})")


def _adds_bos(tokenizer: Any) -> bool:
  bos = getattr(tokenizer, "bos_token_id", None)
  ids = tokenizer("a")["input_ids"]
  return bos is not None and bool(ids) and ids[0] == bos


class PromptFormatter:
  """Formats records for one tokenizer; see the module docstring.

  Args:
    tokenizer: the tokenizer the formatted text will be encoded with.
    mode: one of `FORMATS`.
    template: the plain template (must contain ``{prompt}``).
  """

  def __init__(self, tokenizer: Any, mode: str = "auto", template: str = "{prompt}"):
    if mode not in FORMATS:
      raise ValueError(f"prompt format must be one of {FORMATS}, got {mode!r}")
    check_template(template)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "chat" and not has_template:
      name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
      raise TokenizerError(f"config.data.prompt_format='chat': tokenizer {name} has no chat "
                           "template; use 'plain' (with data.prompt_template) or 'auto'")
    self.tokenizer, self.template = tokenizer, template
    self.chat = mode == "chat" or (mode == "auto" and has_template)
    bos = getattr(tokenizer, "bos_token", None)
    self._strip_bos = bos if self.chat and bos and _adds_bos(tokenizer) else None

  def describe(self) -> str:
    return ("the tokenizer's chat template" if self.chat
            else f"the plain template {self.template!r}")

  def messages(self, record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages of `record`: its ``context`` turns, else one user turn."""
    context = record.get("context")
    if context:
      return [{"role": t["role"], "content": t["content"]} for t in context]
    return [{"role": "user", "content": record["prompt"]}]

  def prompt(self, record: Mapping[str, Any], where: str = "") -> str:
    if not self.chat:
      return self.template.format(prompt=record["prompt"])
    try:
      text = self.tokenizer.apply_chat_template(self.messages(record), tokenize=False,
                                                add_generation_prompt=True)
    except Exception as e:  # jinja2 raises its own errors, e.g. for roles out of order
      raise DataError(f"{where or 'a record'}: the tokenizer's chat template failed on this "
                      f"conversation: {type(e).__name__}: {e}") from None
    if self._strip_bos and text.startswith(self._strip_bos):
      text = text[len(self._strip_bos):]
    return text

  def __call__(self, record: Mapping[str, Any], kind: str) -> Record:
    """`record`, checked against `kind` (`check_record`: a DataError names its line and key),
    with its prompt formatted and only the fields of `kind`."""
    where = getattr(record, "where", "") or "a record"
    fields = dict(check_record(record, kind, where))  # before formatting: an empty prompt
    fields["prompt"] = self.prompt(record, where)    # must not hide inside a template
    if self.chat:
      for key in RESPONSE_KEYS:
        if key in fields:
          fields[key] = fields[key].strip()
    return Record(fields, where)

  def records(self, records: Sequence[Mapping[str, Any]], kind: str) -> list[Record]:
    return [self(r, kind) for r in records]
