"""How much to trust a finding: significance (stats), the masking check
(causal) and model-derived names (names)."""
