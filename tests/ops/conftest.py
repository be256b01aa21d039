import torch


def zipf_logits(vocab: int, n: int, exponent: float = 1.0) -> torch.Tensor:
    """[n, vocab] logits of the Zipf distribution p_i ~ 1 / i**exponent (a stride-0 view)."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    return (-exponent * ranks.log()).float().expand(n, vocab)


def zipf_probs(vocab: int, exponent: float = 1.0) -> torch.Tensor:
    p = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    return p / p.sum()
