"""The model organism: a tiny Qwen2 reasoning model, trained from scratch on CPU, that thinks too briefly.

`python -m ctt.organism` trains it (train.py) on the task's traces (task.py) with a character-level R1-style
tokenizer (tokenizer.py) and measures its card (measure.py, card.py). The trained model ships in `MODEL_DIR`
(loaded by `model=organism`); its card is `MODEL_DIR / "ORGANISM.md"`.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
MODEL_R1_DIR = Path(__file__).resolve().parent / "model_r1"  # organism_r1 (`ctt-organism --task r1`, task_r1.py)
