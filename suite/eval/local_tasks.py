"""lm-evaluation-harness task YAMLs over local JSON-lines files, so the harness scores a task of one's own
with no hub access (pass the folder with ``lm_eval.tasks.TaskManager(include_path=FOLDER)``). Imports
neither lm_eval nor torch."""
from __future__ import annotations

from pathlib import Path

_HEAD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
MULTIPLE_CHOICE = _HEAD + """output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLLING = _HEAD + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_task(yaml_path: Path, name: str, data: Path, kind: str = "multiple_choice") -> Path:
    """Writes the YAML of task ``name`` over ``data``: JSON lines of {context, choices, label}
    (``multiple_choice``) or of {text} (``rolling``: loglikelihood_rolling, perplexity and bits per byte)."""
    template = {"multiple_choice": MULTIPLE_CHOICE, "rolling": ROLLING}[kind]
    yaml_path.write_text(template.format(name=name, data=data))
    return yaml_path
