"""What a question says to the model: one user message. `ChatFormat.prompt_ids` (`rollout/chat_format.py`) renders
it in the model's own chat template, with the tools' schemas where the task has tools.

The dice family renders to exactly the TRL peer harness's prompt (question, a space, the instruction, as one user
message), so the two systems see the same text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the TRL peer's venv imports the instructions below without our dependencies
    from rollout.questions import Question

STRICT_INSTRUCTION = "Answer with <answer>p</answer>."
REASONING_INSTRUCTION = "Think it through step by step, then answer with <answer>p</answer>."
TOOLS_INSTRUCTION = "You may look things up with the tools first."


def user_message(q: Question, reasoning: bool = False, tools: bool = False) -> str:
    extras = []
    if q.background.strip():
        extras.append(f"Background: {q.background.strip()}")
    if q.resolution_criteria.strip():
        extras.append(f"Resolution criteria: {q.resolution_criteria.strip()}")
    if q.as_of is not None:
        extras.append(f"Today's date is {q.as_of.isoformat()}.")
    instruction = REASONING_INSTRUCTION if reasoning else STRICT_INSTRUCTION
    if tools:
        instruction = f"{TOOLS_INSTRUCTION} {instruction}"
    if not extras:
        return f"{q.text.strip()} {instruction}"
    return "\n\n".join([q.text.strip(), *extras, instruction])
