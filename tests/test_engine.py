"""The rollout engine as `rollout.engine.make_engine` builds it, on this machine's CPU: a group's samples share their
prompt's prefill. vLLM's prefix cache shares whole KV blocks only, and its CPU default block (128 tokens) is longer
than most prompts here, so without `CPU_BLOCK_SIZE` every one of a group's G samples prefilled its prompt afresh
(70% of a SmolLM2 dice step's generation; bench/README.md). The samples go as separate requests because vLLM reports
cached tokens per request (with `n` > 1 it reports one child's); a group's `n` samples are child requests of one
prompt over the same cache. The engine runs in a child process: vLLM in-process sets process-wide state this test
process should not carry. SmolLM2-135M gives the same [0, 64, 64, 64] (run by hand: the test is about token ids).
"""

import json
import subprocess
import sys

import pytest

from rollout import engine
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

PROMPT_TOKENS = 70  # two whole 32-token blocks; less than one of vLLM's CPU default 128
SAMPLES = 4

CHILD = f"""
import json, sys
from rollout import engine
engine.configure_env(1, None)
from vllm.inputs import TokensPrompt
llm = engine.make_engine(sys.argv[1], dtype="float32", max_model_len=256, seed=0)
params = engine.sampling_params(temperature=1.0, top_p=1.0, max_tokens=2, stop_token_ids=[])
prompt = TokensPrompt(prompt_token_ids=list(range(100, 100 + {PROMPT_TOKENS})))
outs = llm.generate([prompt] * {SAMPLES}, params, use_tqdm=False)
print(json.dumps(dict(block_size=llm.llm_engine.vllm_config.cache_config.block_size,
                      cached=[o.num_cached_tokens for o in outs])))
"""


def test_samples_of_one_prompt_share_its_prefill(tiny_model):
    run = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["block_size"] == engine.CPU_BLOCK_SIZE
    # the first request computes the prompt; every later one finds its two whole 32-token blocks in the cache (with
    # a block as long as the prompt or longer, none)
    assert sorted(got["cached"]) == [0] + [64] * (SAMPLES - 1), got
