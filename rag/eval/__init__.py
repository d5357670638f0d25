"""Evaluation data and scores for rag/: a seeded synthetic corpus with single- and two-hop questions, a
chunking set with gold boundaries (`synthetic`), and the answer / segmentation metrics (`metrics`)."""
