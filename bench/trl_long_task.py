"""Run the TRL peer harness unmodified on the reasoning shape: the same dice problems, asked with our reasoning
instruction, the answer being the last tag. Only the harness's task text and its STRICT switch change (task.py
documents both); TRL itself is untouched.

    /tmp/venv-trl/bin/python bench/trl_long_task.py [run_trl.py arguments]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peers" / "trl"
sys.path.insert(0, str(PEER))
sys.path.insert(0, str(ROOT))

import task  # noqa: E402  (the harness's)

from rollout.prompts import REASONING_INSTRUCTION, STRICT_INSTRUCTION  # noqa: E402

_strict_text = task.problem_text
task.problem_text = lambda n, kind, k: _strict_text(n, kind, k).replace(STRICT_INSTRUCTION, REASONING_INSTRUCTION)
task.STRICT = False

import run_trl  # noqa: E402

if __name__ == "__main__":
    run_trl.main()
