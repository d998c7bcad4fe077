"""Data that ships with ul2: a small English corpus and a SentencePiece vocabulary.

Paths only; nothing here imports TensorFlow or JAX. The scripts that built the
files sit beside them (`build_corpus.py`, `build_vocab.py`, `build_title_task.py`,
`build_word_task.py`,
`build_continue_task.py`).
"""

import pathlib

ASSETS_DIR = pathlib.Path(__file__).parent
TRAIN_TEXT = ASSETS_DIR / "train.txt"
VALIDATION_TEXT = ASSETS_DIR / "validation.txt"
VOCAB_PATH = ASSETS_DIR / "ul2_8k.model"
EXTRA_IDS = 100
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
# The supervised task `local_title` (built from the corpus by build_title_task.py).
TITLE_TRAIN = ASSETS_DIR / "title_train.jsonl"
TITLE_VALIDATION = ASSETS_DIR / "title_validation.jsonl"
# The supervised task `local_word` (built from the corpus by build_word_task.py).
WORD_TRAIN = ASSETS_DIR / "word_train.jsonl"
WORD_VALIDATION = ASSETS_DIR / "word_validation.jsonl"
# The supervised task `local_continue` (built from the corpus by build_continue_task.py).
CONTINUE_TRAIN = ASSETS_DIR / "continue_train.jsonl"
CONTINUE_VALIDATION = ASSETS_DIR / "continue_validation.jsonl"
