"""What a model is: its architecture (dense or MoE) and its checkpoint (checked, cached, pinned, from the Hub), and
the two things eval asks of a loaded model: greedy generation and log-likelihoods."""
