"""The method: regions, embeddings, scores, clustering, ranking, findings and\ntheir evidence. Plain torch/numpy/pyarrow; never imports Dagster."""
