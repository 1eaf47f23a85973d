"""Continual updates with memory replay: a bounded reservoir memory stored as a shard set, replay mixed into every
batch, EWC / distillation regularisers, and the forgetting report (docs/continual.md)."""
