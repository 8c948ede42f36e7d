"""What ``process_group`` adds: the vocabulary split over ranks
(vocab_parallel.py) and the merge of row statistics of vocabulary pieces
(row_merge.py, shared with the fused head's tiles). Imported only on the path
of a call with a process group or through the fused head."""
