from lowbit.eval.perplexity import perplexity

__all__ = ["perplexity"]
