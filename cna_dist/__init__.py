"""cna-dist: Contrastive Neuron Attribution circuits mined at cluster scale."""

__version__ = "0.1.0"
