"""On-policy alignment: `ncppo iterate` (rounds of generate -> train -> evaluate, with a gold guard)."""
