"""Training data from git history: repositories → declarations (tree-sitter) → function-level changes → tasks
and reasoning from an OpenAI-compatible LLM → fill-in-the-middle samples and input/output pairs.

`workspace.py` (the output folder, the tracked repositories, their commits), `declarations.py` (languages and
declarations with tree-sitter), `changes.py` (the `ast` and `diffs` stages, `coverage`), `llm.py` (the `tasks`
and `reasoning` stages), `samples.py` (the `fim` stage: datasets, splits, de-duplication, card, push) and
`cli.py` (the `build_dataset.py` / `titans-distil data` commands)."""
