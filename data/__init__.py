"""logitcast.data: data preparation, before any teacher or student runs.

Token corpora in shards (`shards`), tokenizing text (`tokenize`, `corpus`), packing
rows the way the trainer sees them (`packing`), and choosing which rows are worth
training on (`select`, MiniPLM difference sampling). Nothing here talks to the fleet
except through the client it is handed.
"""
