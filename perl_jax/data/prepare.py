"""Prepares a published RLHF dataset from downloaded files, for ``data.tfds=NAME``.

    python -m perl_jax.data.prepare --dataset=hh_rlhf --manual_dir=~/hh-rlhf --data_dir=~/tfds

Datasets (`perl_jax.data.tfds_builders.DATASETS`): ``hh_rlhf``, ``tldr_comparisons``,
``tldr_sft``, ``shp``, ``thumbs``. The files are read from ``--manual_dir`` (nothing is
downloaded) and written as array_record under ``--data_dir``; the trainers then take
``--config.data.tfds=NAME --config.data.tfds_dir=DATA_DIR``. Prints a JSON summary (examples per
split, records dropped per split and reason). Bad input exits with status 2 and one line
naming the file, line and key, as ``perl_jax.train`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Sequence

from absl import app, flags

_DATASET = flags.DEFINE_string("dataset", None, "Dataset name, e.g. hh_rlhf.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory holding the downloaded files.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output directory (TFDS data_dir); default: "
                                "TFDS's (~/tensorflow_datasets or $TFDS_DATA_DIR).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if already prepared.")
EXIT_BAD_INPUT = 2


def main(argv: Sequence[str]) -> int:
  import tensorflow_datasets as tfds

  from perl_jax.data import tfds_builders
  from perl_jax.data.jsonl import DataError

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=EXIT_BAD_INPUT)
  if not _DATASET.value or not _MANUAL_DIR.value:
    raise app.UsageError("--dataset and --manual_dir are required; datasets: "
                         f"{', '.join(tfds_builders.DATASETS)}", exitcode=EXIT_BAD_INPUT)
  tfds.disable_progress_bar()
  expand = lambda p: os.path.abspath(os.path.expanduser(p)) if p else ""
  try:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is the summary
      result = tfds_builders.prepare(_DATASET.value, expand(_MANUAL_DIR.value),
                                     expand(_DATA_DIR.value), overwrite=_OVERWRITE.value)
  except DataError as e:
    print(f"perl_jax.data.prepare: bad data: {' '.join(str(e).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  app.run(main)
