"""The evaluation metrics as local `evaluate` metric modules, one script per metric:

- `zero_shot_accuracy.py`: top-k accuracy from class scores per image;
- `retrieval_recall.py`: recall@k in both retrieval directions from caption-to-image scores;
- `ranking.py`: the tie and NaN rule both share (copied along by `evaluate.load`).

They load offline from the installed files, e.g. `evaluate.load(".../lightclip/metrics/retrieval_recall.py")`, or
`lightclip.evaluation.load_metric("retrieval_recall")`, which `lightclip.evaluation` computes its metrics with.
"""
