"""Training a small V4 with dsv4 (issue #14): the synthetic agent corpus (:mod:`dsv4.train.corpus`) and the
model's own byte-level BPE tokenizer (:mod:`dsv4.train.tokenizer`)."""
