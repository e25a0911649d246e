"""Standard prompt sets shipped as package data; load them with `proxy.cli.bench.prompt_set`.

`builtin_v1.jsonl` is `builtin:v1`: 300 hand-written prompts, 50 for each of code, sql,
math, translation, summarization and questions. See README.md in this folder (the data
card). v1 is frozen: any change to its prompts makes a `builtin_v2.jsonl`.
"""
