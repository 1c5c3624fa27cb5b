"""Parsers of published RLHF datasets, in the formats their authors released, into our records.

Each parser reads one upstream file and yields ``(source, example)`` pairs, where ``source`` is
``"<file>:<line>"`` (unique: the TFDS key, and what later error messages name) and ``example``
holds the trainers' fields (`perl_jax.data.jsonl.KINDS`) plus ``context``, the conversation as
``[{"role": "user" | "assistant", "content": str}, ...]`` for chat templates
(`perl_jax.data.formatting`). Malformed lines are a `DataError` naming file, line and key.

Plain-text layout (what ``data.prompt_format="plain"`` trains on) follows the DPO reference
implementation (eric-mitchell/direct-preference-optimization) and TRL's TL;DR sets: the prompt
ends with a cue (``"\\n\\nAssistant:"`` or ``"TL;DR:"``) and every response is one space
followed by its stripped text, so prompt + response reads as the original text. Chat formatting
strips that space again.

Records dropped, never silently: each parser counts them by reason in `dropped` (a
`collections.Counter`); `perl_jax.data.tfds_builders` stores the counts in the prepared
dataset's metadata and logs them. The reasons:

* ``identical``: chosen and rejected say the same thing (after stripping whitespace). Such a
  pair carries no preference; with reward centering it would only pull both scores to 0.
  HH-RLHF has some; TRL/OpenRLHF keep them, but the DPO and RM losses get no signal from
  them, so we drop them (as several HH clean-ups do) and report how many.
* ``tie`` (SHP): ``score_A == score_B``: no evidence that either reply is preferred.
* ``empty_response``: a final assistant turn with no text (HH has a few).
* ``last_turn_not_assistant`` (HH): the dialogue ends with a human turn, so there is no
  final assistant response to compare.
* ``prompt_mismatch`` (HH): chosen and rejected dialogues differ before the final assistant
  turn, so there is no shared prompt to compare the two responses under.
* ``not_tldr`` (summarize-from-feedback comparisons): CNN/DM article batches (``info`` has an
  ``article``, no ``post``), which are not TL;DR.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Iterator

from perl_jax.data.jsonl import DataError, json_lines

Example = dict[str, Any]
# The datasets `perl_jax.data.tfds_builders` prepares: name -> (kind, default evaluation split).
# Kept here, free of TFDS imports, so config validation can name them cheaply.
DATASETS = {"hh_rlhf": ("pairwise", "test"), "tldr_comparisons": ("pairwise", "validation"),
            "tldr_sft": ("sft", "validation"), "shp": ("pairwise", "validation"),
            "thumbs": ("pointwise", "validation")}
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant", "USER": "user", "ASSISTANT": "assistant"}
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
THUMBS = {"thumbs_up": True, "thumbs_down": False, True: True, False: False}


def _field(record: Any, key: str, where: str, types: type | tuple = str) -> Any:
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if key not in record:
    raise DataError(f"{where}: missing key {key!r} (keys present: "
                    f"{', '.join(map(repr, record)) or 'none'})")
  value = record[key]
  if not isinstance(value, types) or isinstance(value, bool):  # bool is an int: never a count
    raise DataError(f"{where}: key {key!r} has the wrong type ({type(value).__name__})")
  return value


def response(text: str) -> str:
  """The plain-text response layout: one space, then the stripped text."""
  return " " + text.strip()


def plain_dialogue(turns: list[dict[str, str]]) -> str:
  """HH's plain layout of a conversation, ending with the cue for the assistant's reply."""
  names = {"user": HUMAN, "assistant": ASSISTANT}
  return "".join(f"{names[t['role']]} {t['content']}" for t in turns) + ASSISTANT


def dialogue_turns(text: str, where: str) -> list[dict[str, str]]:
  """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` as user/assistant turns (contents stripped).

  Consecutive turns of one speaker are merged (joined by a blank line): HH has a few, and most
  chat templates insist on alternating roles.
  """
  if text.startswith(("Human:", "Assistant:")):
    text = "\n\n" + text
  pieces = _TURN.split(text)
  if pieces[0].strip():
    raise DataError(f"{where}: text before the first '\\n\\nHuman:' turn: {pieces[0][:40]!r}")
  turns: list[dict[str, str]] = []
  for speaker, content in zip(pieces[1::2], pieces[2::2]):
    role, content = _ROLES[speaker], content.strip()
    if turns and turns[-1]["role"] == role:
      turns[-1]["content"] = (turns[-1]["content"] + "\n\n" + content).strip()
    else:
      turns.append({"role": role, "content": content})
  if not turns:
    raise DataError(f"{where}: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
  return turns


def split_dialogue(text: str, where: str) -> tuple[str, str]:
  """(prompt through the last ``"\\n\\nAssistant:"``, the final assistant response)."""
  cut = text.rfind(ASSISTANT)
  if cut < 0:
    raise DataError(f"{where}: no '\\n\\nAssistant:' turn to take the response from")
  return text[:cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]


def _name(path: str, root: str | None) -> str:
  return os.path.relpath(path, root) if root else str(path)


def hh_rlhf(path: str, dropped: collections.Counter, root: str | None = None
            ) -> Iterator[tuple[str, Example]]:
  """Anthropic HH-RLHF (``{"chosen", "rejected"}`` full dialogues per line, jsonl or jsonl.gz).

  The shared prompt is the dialogue through the last ``"\\n\\nAssistant:"``; chosen and
  rejected are the two final assistant turns.
  """
  for line, record in json_lines(path):
    source = f"{_name(path, root)}:{line}"
    where = f"{path}:{line}"
    chosen, rejected = (_field(record, k, where) for k in ("chosen", "rejected"))
    prompt, chosen_text = split_dialogue(chosen, f"{where}: key 'chosen'")
    prompt_r, rejected_text = split_dialogue(rejected, f"{where}: key 'rejected'")
    if HUMAN in chosen_text or HUMAN in rejected_text:
      dropped["last_turn_not_assistant"] += 1
    elif prompt != prompt_r:
      dropped["prompt_mismatch"] += 1
    elif not chosen_text.strip() or not rejected_text.strip():
      dropped["empty_response"] += 1
    elif chosen_text.strip() == rejected_text.strip():
      dropped["identical"] += 1
    else:
      context = dialogue_turns(prompt[:-len(ASSISTANT)], f"{where}: key 'chosen'")
      yield source, {"prompt": prompt, "context": context, "chosen": response(chosen_text),
                     "rejected": response(rejected_text), "source": source}


def _tldr_prompt(info: Any, where: str) -> str:
  fields = {k: _field(info, k, f"{where}: key 'info'") for k in ("subreddit", "title", "post")}
  return TLDR_PROMPT.format(**{k: v.strip() for k, v in fields.items()})


def tldr_comparisons(path: str, split: str, dropped: collections.Counter,
                     root: str | None = None) -> Iterator[tuple[str, Example]]:
  """summarize-from-feedback ``comparisons/batch*.json`` lines whose ``split`` is `split`
  (``train``, ``valid1``, ``valid2``): ``info`` {post, title, subreddit, ...}, two
  ``summaries`` [{text, policy, note}], ``choice`` (index of the preferred summary)."""
  for line, record in json_lines(path):
    source = f"{_name(path, root)}:{line}"
    where = f"{path}:{line}"
    if _field(record, "split", where) != split:
      continue
    info = _field(record, "info", where, dict)
    if info.get("post") is None:
      dropped["not_tldr"] += 1
      continue
    summaries = _field(record, "summaries", where, list)
    if len(summaries) != 2:
      raise DataError(f"{where}: key 'summaries' must hold 2 summaries, got {len(summaries)}")
    texts = [_field(s, "text", f"{where}: key 'summaries'") for s in summaries]
    choice = _field(record, "choice", where, int)
    if choice not in (0, 1):
      raise DataError(f"{where}: key 'choice' must be 0 or 1, got {choice}")
    prompt = _tldr_prompt(info, where)
    if not texts[0].strip() or not texts[1].strip():
      dropped["empty_response"] += 1
    elif texts[0].strip() == texts[1].strip():
      dropped["identical"] += 1
    else:
      yield source, {"prompt": prompt, "context": [{"role": "user", "content": prompt}],
                     "chosen": response(texts[choice]), "rejected": response(texts[1 - choice]),
                     "source": source}


def tldr_sft(path: str, dropped: collections.Counter, root: str | None = None
             ) -> Iterator[tuple[str, Example]]:
  """The filtered TL;DR SFT set (tldr_3_filtered ``train/valid/test.jsonl``): one post per
  line with ``id, subreddit, title, post, summary``."""
  for line, record in json_lines(path):
    source = f"{_name(path, root)}:{line}"
    where = f"{path}:{line}"
    prompt = _tldr_prompt(record, where)
    summary = _field(record, "summary", where)
    if not summary.strip():
      dropped["empty_response"] += 1
      continue
    yield source, {"prompt": prompt, "context": [{"role": "user", "content": prompt}],
                   "response": response(summary), "source": source}


def shp(path: str, dropped: collections.Counter, root: str | None = None
        ) -> Iterator[tuple[str, Example]]:
  """Stanford Human Preferences (``<domain>/<split>.json`` lines): a Reddit post
  (``history``), two comments (``human_ref_A/B``), ``labels`` (1: A preferred), and the
  comments' ``score_A/B``. The prompt wraps the post as one HH-style human turn, as the DPO
  reference implementation does."""
  for line, record in json_lines(path):
    source = f"{_name(path, root)}:{line}"
    where = f"{path}:{line}"
    history = _field(record, "history", where)
    a, b = _field(record, "human_ref_A", where), _field(record, "human_ref_B", where)
    label = _field(record, "labels", where, int)
    if label not in (0, 1):
      raise DataError(f"{where}: key 'labels' must be 0 or 1, got {label}")
    score_a, score_b = (_field(record, k, where, (int, float)) for k in ("score_A", "score_B"))
    if score_a == score_b:
      dropped["tie"] += 1
    elif not a.strip() or not b.strip():
      dropped["empty_response"] += 1
    elif a.strip() == b.strip():
      dropped["identical"] += 1
    else:
      context = [{"role": "user", "content": history.strip()}]
      chosen, rejected = (a, b) if label == 1 else (b, a)
      yield source, {"prompt": plain_dialogue(context), "context": context,
                     "chosen": response(chosen), "rejected": response(rejected),
                     "source": source}


def thumbs(path: str, dropped: collections.Counter, root: str | None = None
           ) -> Iterator[tuple[str, Example]]:
  """Pointwise thumbs-up/down ratings of an assistant's next turn, in the style of PERL's
  Taskmaster Coffee and Ticketing sets. One JSON object per line::

      {"context": [{"speaker": "USER", "text": "..."}, {"speaker": "ASSISTANT", ...}, ...],
       "response": "the assistant turn that was rated",
       "rating": "thumbs_up" | "thumbs_down"}       (true/false and 1/0 also accepted)

  ``context`` uses Taskmaster's utterance fields (``speaker`` USER/ASSISTANT, ``text``); other
  keys (``conversation_id``, ``instruction_id``, ...) are ignored. The prompt is the context in
  HH's plain layout; the label is 1 for thumbs up.
  """
  del dropped  # nothing here is dropped: every malformed line is an error
  for line, record in json_lines(path):
    source = f"{_name(path, root)}:{line}"
    where = f"{path}:{line}"
    utterances = _field(record, "context", where, list)
    if not utterances:
      raise DataError(f"{where}: key 'context' is empty: a rated response needs a conversation")
    context: list[dict[str, str]] = []
    for i, u in enumerate(utterances):
      speaker = _field(u, "speaker", f"{where}: context[{i}]")
      if speaker.upper() not in _ROLES:
        raise DataError(f"{where}: context[{i}]: speaker must be USER or ASSISTANT, got "
                        f"{speaker!r}")
      text = _field(u, "text", f"{where}: context[{i}]").strip()
      role = _ROLES[speaker.upper()]
      if context and context[-1]["role"] == role:
        context[-1]["content"] += "\n\n" + text
      else:
        context.append({"role": role, "content": text})
    reply = _field(record, "response", where)
    if not reply.strip():
      raise DataError(f"{where}: key 'response' is empty")
    rating = record.get("rating")
    rating = rating.lower() if isinstance(rating, str) else rating if type(rating) in (
        bool, int) else None  # type(): 1.0 == True, but a score is not a rating
    if rating not in THUMBS:
      raise DataError(f"{where}: key 'rating' must be 'thumbs_up' or 'thumbs_down' (or "
                      f"true/false, 1/0), got {record.get('rating')!r}")
    yield source, {"prompt": plain_dialogue(context), "context": context,
                   "response": response(reply), "label": THUMBS[rating], "source": source}
