"""The lifelong-learning study of issue 14 item 8: domains, a cached base model, tables (a)-(d), reports.

    python -m moedist.study domains runs/study/domains     # code / prose / man as jsonl splits
    python -m moedist.study run a                          # table (a) from configs/study/a.yaml
    python -m moedist.study report a                       # markdown + PNG from the runs' summary.json
"""
