"""The fused linear head: per-token numbers from hidden states and an LM head
weight without building the logits (head.py: linear_log_prob and
linear_sample with their tile engine; policy_loss.py: linear_policy_loss;
kl_penalty.py: linear_kl_penalty)."""
