"""Metrics of top-k selection and ranking: top-k accuracy, Recall@k@m, cascade recall, NDCG@k."""

from ._topk import cascade_recall, ndcg_at_k, recall_at_k_at_m, topk_accuracy

__all__ = ["cascade_recall", "ndcg_at_k", "recall_at_k_at_m", "topk_accuracy"]
