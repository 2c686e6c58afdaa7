"""A question becomes a chat prompt in the model's own chat template, as exact token ids.

The dice family renders to exactly the TRL peer harness's prompt (question, a space, the instruction, as one user
message), so the two systems see the same text. With tools, their schemas go to the chat template (`tools=`), which
lays them out in the system turn as the model was trained to read them (Qwen2.5: a `# Tools` block).
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


def chat_prompt_ids(tokenizer, q: Question, reasoning: bool = False, tools: list[dict] | None = None) -> list[int]:
    """tools: function schemas (`rollout.tool_calls.schemas`), or None for a prompt without tools."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message(q, reasoning, bool(tools))}],
                                         tools=tools or None, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
