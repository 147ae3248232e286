"""The comparison report that ends a BTX experiment (`nemo-btx report`).

It reads only files of the run directory, never checkpoints, and imports neither torch nor
megatron, so it runs in seconds on a login node while jobs are still writing. The pieces go one
way: `collect` (files -> one plain dict) -> `compute`, `findings`, `tables`, `plots` (numbers,
sentences, figures from that dict) -> `document` (the page as blocks) -> `markdown` / `html`.
"""
