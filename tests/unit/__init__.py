"""Unit tier: rope_ext's pure math (a package, so its module names cannot clash with other tiers')."""
