"""Where models come from, for both roles: the tiny model built here (`tiny.py`), a real pretrained model imported
from a GGUF file (`gguf_import.py`), what `forecast-grpo model check` says about a model (`check.py`), and the format
warm start any model can take before GRPO (`warmstart.py`)."""
