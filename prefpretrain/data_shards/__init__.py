"""Raw corpora -> scored, tokenized WebDataset shards -> packed, ordered training samples."""
