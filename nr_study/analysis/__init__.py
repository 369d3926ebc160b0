"""Tables and plots from MLflow runs; the paper's numbers as data (paper_results.yaml).

Reads MLflow only: never imports the trainer (nr_study.train, nr_study.nr) or torch.
"""
