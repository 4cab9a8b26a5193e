"""LoRA graph mechanics: adaptable sites, the branch rewrite, and per-row run feeds."""
