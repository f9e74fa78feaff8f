"""Client tier: ropeserve_client against an in-process fake gateway (a package, so its module names
cannot clash with other tiers')."""
